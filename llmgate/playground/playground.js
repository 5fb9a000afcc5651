// llmgate playground: talk to a route as Agora's engine does, hear the answer, and see
// where each turn's time went. A plain ES module: no build step, nothing from elsewhere.
//
// Every text that comes from the model, a tool, a document or the server goes into the
// page as text (textContent, Text nodes), never as HTML.

const KEY_STORE = "llmgate.playground.key"; // sessionStorage only: gone with the tab
const TIMING = ": llmgate-timing ";
const OPENAI_RATE = 24000; // a model's own delta.audio (OpenAI's pcm16)
const LIVE_ROWS = 100;

const $ = (id) => document.getElementById(id);
const ROOT = new URL(".", location.href); // the page is <ROOT>playground
const at = (path) => new URL(path.replace(/^\//, ""), ROOT);

// Counters for tests and the curious.
const stats = {turns: 0, samples: 0, lastText: "", bars: 0, liveTurns: 0};
window.llmgatePlayground = stats;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  routes: [],
  channel: newChannel(),
  nextTurn: 0, // Agora's turn_id counts from 0
  history: [], // {role, content, turn_id, timestamp, flag?}
  current: null, // the turn whose answer streams
  mine: new Map(), // request id -> Turn (the live feed fills in a clock a turn lacks)
  live: null, // the live feed's AbortController
};

// ---------------------------------------------------------------- small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined)); // strings: Text nodes
  return node;
}

function say(message, bad = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", bad);
}

function hex(bytes) {
  const values = crypto.getRandomValues(new Uint8Array(bytes)); // (no secure context needed)
  return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
}

function newChannel() {
  return "playground-" + hex(4);
}

function fmt(ms) {
  return typeof ms === "number" ? ms.toFixed(ms < 10 ? 1 : 0) : "";
}

function authHeaders(extra = {}) {
  return {Authorization: "Bearer " + state.key, ...extra};
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return String(body.error.message);
  } catch {
    // not JSON: the status says it
  }
  return resp.statusText || "error";
}

async function getJson(path) {
  const resp = await fetch(at(path), {headers: authHeaders()});
  if (!resp.ok) throw new Error(`${path}: ${resp.status} ${await errorOf(resp)}`);
  return resp.json();
}

// Server-Sent Events, read from a fetch body (EventSource cannot send a bearer).
async function readEvents(resp, onEvent, onComment) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  let event = "message";
  const line = (text) => {
    if (text === "") {
      if (data.length) onEvent(event, data.join("\n"));
      data = [];
      event = "message";
    } else if (text.startsWith(":")) {
      if (onComment) onComment(text);
    } else {
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") event = value;
    }
  };
  let first = true;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    if (first && onComment) onComment(null); // (first byte)
    first = false;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const eol = buffer[cut] === "\r" && buffer[cut + 1] === "\n" ? 2 : 1;
      if (buffer[cut] === "\r" && cut + 1 === buffer.length) break; // \r\n may be split
      line(buffer.slice(0, cut));
      buffer = buffer.slice(cut + eol);
    }
  }
  if (buffer) line(buffer);
  line("");
}

// ---------------------------------------------------------------- audio

const player = {ctx: null, nextStart: 0};

function audioContext() {
  if (!player.ctx) {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return null;
    try {
      player.ctx = new Context();
    } catch {
      return null;
    }
  }
  if (player.ctx.state === "suspended") player.ctx.resume().catch(() => {});
  return player.ctx;
}

function base64Bytes(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function wavBlob(chunks, rate) {
  const count = chunks.reduce((n, c) => n + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + count * 2));
  const ascii = (offset, text) => {
    for (let i = 0; i < text.length; i++) view.setUint8(offset + i, text.charCodeAt(i));
  };
  ascii(0, "RIFF");
  view.setUint32(4, 36 + count * 2, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes a second
  view.setUint16(32, 2, true); // bytes a frame
  view.setUint16(34, 16, true); // bits a sample
  ascii(36, "data");
  view.setUint32(40, count * 2, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (let i = 0; i < chunk.length; i++, offset += 2) view.setInt16(offset, chunk[i], true);
  }
  return new Blob([view.buffer], {type: "audio/wav"});
}

// ---------------------------------------------------------------- one turn

class Turn {
  constructor(turnId, route, model) {
    this.turnId = turnId;
    this.route = route;
    this.model = model;
    this.rate = route.stages.audio ? route.stages.audio.sample_rate : OPENAI_RATE;
    this.controller = new AbortController();
    this.t0 = performance.now();
    this.browser = {}; // request sent, response headers, first byte, first audio played, end
    this.clock = null; // the server's (the `: llmgate-timing` line, or the live feed)
    this.pieces = []; // {text, source, at, said, node}
    this.calls = []; // the caller's tool calls (delta.tool_calls)
    this.pcm = [];
    this.carry = null; // an odd byte of PCM16 cut between two frames
    this.samples = 0;
    this.sources = []; // scheduled AudioBufferSourceNodes
    this.recorded = false; // its assistant message is in the history
    this.ended = false;
    this.outcome = "streaming";
    this.requestId = null;
    this.view = this.build();
  }

  now() {
    return performance.now() - this.t0;
  }

  mark(name) {
    if (this.browser[name] === undefined) this.browser[name] = Math.round(this.now() * 100) / 100;
  }

  build() {
    const stages = describeStages(this.route);
    const view = {
      outcome: el("span", {class: "outcome", text: "streaming"}),
      answer: el("div", {class: "answer", "aria-live": "polite"}),
      calls: el("ul", {class: "details calls"}),
      rounds: el("ul", {class: "details rounds"}),
      sources: el("ul", {class: "details sources"}),
      wav: el("a", {class: "wav", hidden: ""}),
      waterfall: el("div", {class: "waterfall"}),
    };
    const title = el("h3", {},
      `turn_id ${this.turnId} · ${this.route.path} · ${this.model}${stages ? " · " + stages : ""}`,
      view.outcome);
    view.root = el("article", {class: "turn"}, title, view.answer, view.calls, view.rounds,
      view.sources, view.wav, view.waterfall);
    $("turns").prepend(view.root);
    return view;
  }

  setOutcome(text, bad = false) {
    this.outcome = text;
    this.view.outcome.textContent = text;
    this.view.outcome.classList.toggle("bad", bad);
  }

  // --- what the stream brings

  chunk(payload) {
    let obj;
    try {
      obj = JSON.parse(payload);
    } catch {
      this.setOutcome("a frame that is not JSON", true);
      return;
    }
    if (obj && obj.error) {
      this.error = String(obj.error.message || "error");
      this.setOutcome("error: " + this.error, true);
      return;
    }
    const choice = obj && Array.isArray(obj.choices) ? obj.choices[0] : null;
    if (!choice) return;
    const delta = choice.delta || {};
    if (typeof delta.content === "string" && delta.content) this.text(delta.content, "content");
    else if (Array.isArray(delta.content)) {
      for (const part of delta.content) {
        if (part && typeof part.text === "string") this.text(part.text, "content");
      }
    }
    if (Array.isArray(delta.tool_calls)) this.toolCalls(delta.tool_calls);
    if (delta.audio && typeof delta.audio === "object") {
      if (typeof delta.audio.transcript === "string") this.text(delta.audio.transcript, "transcript");
      if (typeof delta.audio.data === "string") this.audio(delta.audio.data);
    }
    if (choice.finish_reason) this.finish = choice.finish_reason;
  }

  text(piece, source) {
    const said = saidBy(this.route, piece);
    const item = {text: piece, source, at: this.now(), said, start: null, node: null};
    if (source === "transcript" && player.ctx) {
      item.start = Math.max(player.ctx.currentTime, player.nextStart); // its audio's start
    }
    // an audio stage's transcripts are sentences: a space between them
    const before = this.pieces.length ? this.pieces[this.pieces.length - 1].text : "";
    const gap = source === "transcript" && this.route.stages.audio && before &&
      !/\s$/.test(before) && !/^\s/.test(piece) ? " " : "";
    item.text = gap + piece;
    item.node = el("span", {}, item.text);
    this.pieces.push(item);
    this.view.answer.append(item.node);
    if (said) this.label(item, said);
    stats.lastText = this.fullText();
  }

  label(item, said) {
    const names = {waiting: "waiting phrase", filler: "filler", apology: "apology"};
    item.said = said;
    item.node.classList.add("said");
    item.node.prepend(el("span", {class: "tag", text: names[said] || said}));
  }

  fullText() {
    return this.pieces.map((p) => p.text).join("");
  }

  // what the person on the call heard so far (Agora's memory keeps that after a barge-in)
  heardText() {
    const ctx = player.ctx;
    const audible = ctx && ctx.state === "running";
    return this.pieces
      .filter((p) => p.start === null || !audible || p.start <= ctx.currentTime)
      .map((p) => p.text).join("").trim();
  }

  toolCalls(deltas) {
    for (const delta of deltas) {
      const index = Number.isInteger(delta.index) ? delta.index : this.calls.length;
      let call = this.calls[index];
      if (!call) {
        call = this.calls[index] = {id: "", name: "", arguments: "", node: el("li")};
        this.view.calls.append(call.node);
      }
      if (delta.id) call.id = delta.id;
      const fn = delta.function || {};
      if (typeof fn.name === "string") call.name += fn.name;
      if (typeof fn.arguments === "string") call.arguments += fn.arguments;
      call.node.replaceChildren(el("span", {class: "name", text: "caller's tool call " + call.name}),
        ` ${call.id} ${call.arguments}`);
    }
  }

  audio(data) {
    let bytes;
    try {
      bytes = base64Bytes(data);
    } catch {
      return;
    }
    if (this.carry) {
      const joined = new Uint8Array(bytes.length + 1);
      joined[0] = this.carry;
      joined.set(bytes, 1);
      bytes = joined;
      this.carry = null;
    }
    if (bytes.length % 2) {
      this.carry = bytes[bytes.length - 1];
      bytes = bytes.subarray(0, bytes.length - 1);
    }
    const count = bytes.length / 2;
    if (!count) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    const pcm = new Int16Array(count);
    for (let i = 0; i < count; i++) pcm[i] = view.getInt16(i * 2, true); // little-endian
    this.pcm.push(pcm);
    this.samples += count;
    stats.samples += count;
    this.play(pcm);
  }

  play(pcm) {
    if (this.ended || this.interrupted || this.bargedIn || this.dropped) return; // not heard
    const ctx = audioContext();
    if (!ctx) return;
    const buffer = ctx.createBuffer(1, pcm.length, this.rate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const start = Math.max(ctx.currentTime, player.nextStart); // gapless: one after another
    source.start(start);
    player.nextStart = start + pcm.length / this.rate;
    this.sources.push(source);
    source.onended = () => {
      const i = this.sources.indexOf(source);
      if (i >= 0) this.sources.splice(i, 1);
    };
    if (this.browser.first_audio_played === undefined) {
      const wait = (start - ctx.currentTime) * 1000;
      this.browser.first_audio_played = Math.round((this.now() + wait) * 100) / 100;
    }
  }

  silence() {
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        // not started yet, or over
      }
    }
    this.sources = [];
    if (player.ctx) player.nextStart = player.ctx.currentTime;
  }

  // --- the end

  end(outcome, bad = false) {
    if (this.ended) return;
    this.ended = true;
    this.mark("end");
    if (this.outcome === "streaming" || !bad) this.setOutcome(outcome, bad);
    if (this.clock) this.fromClock();
    this.labelFromClock();
    if (this.samples) {
      const url = URL.createObjectURL(wavBlob(this.pcm, this.rate));
      this.view.wav.href = url;
      this.view.wav.download = `llmgate-turn-${this.turnId}.wav`;
      this.view.wav.textContent = `Download WAV (${(this.samples / this.rate).toFixed(2)} s, ${this.rate} Hz)`;
      this.view.wav.hidden = false;
    }
    this.draw();
  }

  // the waiting phrase, where no phrase from the route's config matched: the first
  // content that came before the model's first token
  labelFromClock() {
    if (!this.clock || this.clock.waiting_phrase === undefined) return;
    if (this.pieces.some((p) => p.said === "waiting")) return;
    const first = this.pieces[0];
    if (first && !first.said) this.label(first, "waiting");
  }

  fromClock() {
    const clock = this.clock;
    this.view.rounds.replaceChildren();
    (clock.tool_rounds || []).forEach((round, i) => {
      for (const call of round.calls || []) {
        const line = el("li", {},
          el("span", {class: "name", text: `llmgate's tool round ${i + 1}: ${call.tool}`}),
          ` ${call.ok ? "ok" : "failed"}${call.ms != null ? ", " + fmt(call.ms) + " ms" : ""}`);
        if (call.arguments !== undefined) line.append(`\narguments: ${stringOf(call.arguments)}`);
        if (call.result !== undefined) line.append(`\nresult: ${stringOf(call.result)}`);
        this.view.rounds.append(line);
      }
    });
    this.view.sources.replaceChildren();
    const retrieval = clock.retrieval;
    if (retrieval) {
      this.view.sources.append(el("li", {class: "muted",
        text: `retrieval: ${retrieval.passages} passage(s)`}));
      for (const s of retrieval.sources || []) {
        const score = typeof s.score === "number" ? s.score.toFixed(3) : "";
        this.view.sources.append(el("li", {},
          el("span", {class: "name", text: String(s.source ?? "")}),
          s.heading ? ` · ${s.heading}` : "", score ? ` · score ${score}` : ""));
      }
    }
  }

  draw() {
    drawWaterfall(this.view.waterfall, this.clock, this.browser);
    countBars();
  }
}

function stringOf(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function describeStages(route) {
  if (!route || !route.stages) return "";
  const s = route.stages;
  const out = [];
  if (s.rag) out.push("rag " + s.rag);
  if (s.tools && s.tools.length) out.push("tools " + s.tools.join(", "));
  if (s.audio) out.push(`audio ${s.audio.name} (${s.audio.engine}, ${s.audio.sample_rate} Hz)`);
  else if (s.speech) out.push("speech");
  return out.join(" · ") || "plain relay";
}

function saidBy(route, piece) {
  const text = piece.trim();
  if (!text || !route.phrases) return null;
  for (const [kind, phrases] of Object.entries(route.phrases)) {
    if (phrases.some((p) => p.trim() === text)) return kind;
  }
  return null;
}

// ---------------------------------------------------------------- the waterfall

function serverBars(clock) {
  const bars = [];
  const num = (v) => typeof v === "number";
  const add = (label, start, end, kind = "") => {
    if (num(start) && num(end)) bars.push({label, start, end: Math.max(start, end), kind});
  };
  if (!clock) return bars;
  add("admitted", 0, clock.admitted);
  if (clock.retrieval) {
    const r = clock.retrieval;
    add(`retrieval (${r.passages} passages)`, r.start, num(r.end) ? r.end : clock.done);
  }
  if (num(clock.waiting_phrase)) add("waiting phrase", clock.waiting_phrase, clock.waiting_phrase, "said");
  (clock.attempts || []).forEach((a, i) => {
    const name = `attempt ${i + 1} ${a.target || ""}`;
    if (num(a.status)) {
      add(`${name}: to headers`, a.start, a.status, "model");
      if (num(a.first_token)) {
        add(`${name}: to first token`, a.status, a.first_token, "model");
        add(`${name}: streaming (${a.outcome})`, a.first_token, num(a.end) ? a.end : clock.done, "model");
      } else {
        add(`${name}: ${a.outcome}`, a.status, num(a.end) ? a.end : clock.done, "model");
      }
    } else {
      add(`${name}: ${a.outcome}`, a.start, num(a.end) ? a.end : num(a.first_token) ? a.first_token : clock.done, "model");
    }
  });
  (clock.tool_rounds || []).forEach((r, i) => {
    const names = (r.calls || []).map((c) => c.tool).join(", ");
    add(`tool round ${i + 1}: ${names}`, r.start, r.end, "tool");
  });
  add("first token", 0, clock.first_token);
  if (num(clock.first_sentence)) {
    add("first sentence", num(clock.first_token) ? clock.first_token : 0, clock.first_sentence);
  }
  add("first audio", 0, clock.first_audio);
  add("done", 0, clock.done);
  return bars;
}

function browserBars(browser) {
  const bars = [];
  const add = (label, end) => {
    if (typeof end === "number") bars.push({label, start: 0, end, kind: "browser"});
  };
  if (!browser) return bars;
  add("request sent", browser.sent);
  add("response headers", browser.headers);
  add("first byte", browser.first_byte);
  add("first audio played", browser.first_audio_played);
  add("stream ended", browser.end);
  return bars;
}

function drawWaterfall(container, clock, browser) {
  const server = serverBars(clock);
  const mine = browserBars(browser);
  const scale = Math.max(1, ...server.map((b) => b.end), ...mine.map((b) => b.end));
  const rows = [];
  const side = (name, bars) => {
    if (!bars.length) return;
    rows.push(el("div", {class: "side", text: name}));
    for (const bar of bars) {
      const fill = el("div", {class: "bar " + bar.kind, title: `${bar.label}: ${fmt(bar.start)}–${fmt(bar.end)} ms`});
      fill.style.left = (bar.start / scale) * 100 + "%"; // (set from script: the CSP allows it)
      fill.style.width = ((bar.end - bar.start) / scale) * 100 + "%";
      rows.push(el("div", {class: "row"},
        el("span", {class: "label", text: bar.label, title: bar.label}),
        el("div", {class: "track"}, fill),
        el("span", {class: "ms", text: fmt(bar.end) + " ms"})));
    }
  };
  side("server (ms since the request arrived)", server);
  side("browser (ms since the request was sent)", mine);
  if (!server.length) {
    rows.push(el("div", {class: "muted", text: "no server clock for this turn (yet)"}));
  }
  container.replaceChildren(...rows);
}

function countBars() {
  stats.bars = document.querySelectorAll(".waterfall .bar").length;
}

// ---------------------------------------------------------------- the conversation

function currentRoute() {
  return state.routes[Number($("route").value)] || null;
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren(...state.history.map((m) => {
    const time = new Date(m.timestamp).toLocaleTimeString();
    return el("li", {class: "role-" + m.role},
      el("span", {class: "meta", text: `${m.role} · turn_id ${m.turn_id} · ${m.timestamp} (${time})`}),
      el("span", {class: "content", text: m.content}),
      m.flag ? el("span", {class: "flag", text: m.flag}) : null);
  }));
  list.scrollTop = list.scrollHeight;
}

function record(turn, content, flag) {
  if (turn.recorded) return;
  turn.recorded = true;
  const message = {role: "assistant", content, turn_id: turn.turnId, timestamp: Date.now()};
  if (flag) message.flag = flag;
  // after its own user message(s): a newer turn's may already be there
  const later = state.history.findIndex((m) => m.role === "user" && m.turn_id > turn.turnId);
  if (later < 0) state.history.push(message);
  else state.history.splice(later, 0, message);
  renderHistory();
}

function buttons() {
  const streaming = state.current !== null;
  $("send").disabled = streaming;
  $("interrupt").disabled = !streaming;
  $("barge-in").disabled = !streaming;
}

function send(mode) {
  const route = currentRoute();
  const model = $("model").value.trim();
  const text = $("input").value.trim();
  if (!state.key) return say("Enter a caller key first.", true);
  if (!route) return say("No route: is the key right?", true);
  if (!model) return say("Choose a model.", true);
  if (!text) return say("Type a message first.", true);
  audioContext(); // made (or resumed) on a click: browsers start audio on a gesture
  const previous = state.current;
  if (mode === "interrupt" && previous) {
    // a newer turn on the channel while the answer streams: the server supersedes the
    // older one; what was heard of it stays in the history
    previous.interrupted = true;
    previous.silence();
    record(previous, previous.heardText(), "interrupted: heard so far");
  } else if (mode === "append") {
    // two user messages in a row: the answer to the first is not in the history
    if (previous) {
      previous.dropped = true;
      previous.recorded = true;
      previous.silence();
      previous.controller.abort();
    } else if (state.history.length && state.history[state.history.length - 1].role === "assistant") {
      state.history.pop();
    }
  }
  const turnId = state.nextTurn++;
  state.history.push({role: "user", content: text, turn_id: turnId, timestamp: Date.now()});
  renderHistory();
  $("input").value = "";
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const m of state.history) {
    messages.push({role: m.role, content: m.content, turn_id: m.turn_id, timestamp: m.timestamp});
  }
  const body = {
    model,
    stream: true,
    messages,
    // as Agora's engine sends it: its reference server reads {appId, userId, channel}
    context: {appId: $("app-id").value.trim(), channel: state.channel, userId: $("user-id").value.trim()},
  };
  run(new Turn(turnId, route, model), body);
}

async function run(turn, body) {
  state.current = turn;
  stats.turns += 1;
  buttons();
  say(`turn_id ${turn.turnId}: streaming on ${turn.route.path}`);
  const path = turn.route.paths[turn.route.paths.length - 1] || turn.route.path;
  let ok = false;
  try {
    turn.mark("sent");
    const resp = await fetch(at(path), {
      method: "POST",
      headers: authHeaders({"Content-Type": "application/json", "X-Llmgate-Timing": "1"}),
      body: JSON.stringify(body),
      signal: turn.controller.signal,
    });
    turn.mark("headers");
    turn.requestId = resp.headers.get("X-Request-Id");
    if (turn.requestId) state.mine.set(turn.requestId, turn);
    if (!resp.ok) {
      turn.end(`HTTP ${resp.status}: ${await errorOf(resp)}`, true);
      return;
    }
    let done = false;
    await readEvents(resp, (_event, data) => {
      if (data === "[DONE]") done = true;
      else turn.chunk(data);
    }, (comment) => {
      if (comment === null) turn.mark("first_byte");
      else if (comment.startsWith(TIMING)) {
        try {
          turn.clock = JSON.parse(comment.slice(TIMING.length));
        } catch {
          // a clock we cannot read: the browser's marks still show
        }
      }
    });
    ok = done;
    if (turn.error) turn.end("error: " + turn.error, true);
    else if (done) turn.end(`done${turn.finish ? " (" + turn.finish + ")" : ""}`);
    else if (turn.interrupted) turn.end("superseded by a newer turn (no [DONE])");
    else turn.end("ended without [DONE]", true);
  } catch (err) {
    if (turn.dropped) turn.end("closed: its user message was appended to");
    else if (turn.bargedIn) turn.end("barge-in: closed mid-answer");
    else if (turn.interrupted) turn.end("superseded by a newer turn");
    else turn.end("failed: " + err.message, true);
  } finally {
    if (ok && !turn.recorded) record(turn, turn.fullText().trim());
    if (state.current === turn) {
      state.current = null;
      buttons();
      say(`turn_id ${turn.turnId}: ${turn.outcome}`);
    }
  }
}

function bargeIn() {
  const turn = state.current;
  if (!turn) return;
  turn.bargedIn = true;
  turn.silence();
  record(turn, turn.heardText(), "barge-in: heard so far");
  turn.controller.abort(); // closes the stream: llmgate ends the turn and its upstream request
}

// ---------------------------------------------------------------- routes and models

async function connect() {
  if (!state.key) {
    say("Enter a caller key to begin.");
    return;
  }
  try {
    state.routes = (await getJson("/playground/routes")).filter((r) => r.kind === "chat");
  } catch (err) {
    say(err.message, true);
    return;
  }
  const select = $("route");
  const previous = select.value;
  select.replaceChildren(...state.routes.map((r, i) =>
    el("option", {value: String(i), text: `${r.path} (${describeStages(r)})`})));
  if (previous && state.routes[Number(previous)]) select.value = previous;
  showStages();
  try {
    const models = await getJson("/v1/models");
    const ids = (models.data || []).map((m) => String(m.id));
    $("models").replaceChildren(...ids.map((id) => el("option", {value: id})));
    if (!$("model").value && ids.length) $("model").value = ids[0];
    say(`${state.routes.length} route(s), ${ids.length} model(s). Channel ${state.channel}.`);
  } catch (err) {
    say(err.message, true);
  }
  listen();
}

function showStages() {
  $("stages").textContent = describeStages(currentRoute());
}

// ---------------------------------------------------------------- the live view

async function listen() {
  if (state.live) state.live.abort();
  const controller = new AbortController();
  state.live = controller;
  const label = $("live-state");
  try {
    const resp = await fetch(at("/playground/events"), {
      headers: authHeaders({Accept: "text/event-stream"}),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(`${resp.status} ${await errorOf(resp)}`);
    label.textContent = "listening";
    await readEvents(resp, (event, data) => {
      if (event !== "turn") return;
      try {
        liveTurn(JSON.parse(data));
      } catch {
        // an event we cannot read is skipped
      }
    });
    throw new Error("the feed ended");
  } catch (err) {
    if (controller.signal.aborted) return;
    label.textContent = `not listening (${err.message}); again in 3 s`;
    setTimeout(() => {
      if (state.live === controller) listen();
    }, 3000);
  }
}

function liveTurn(event) {
  stats.liveTurns += 1;
  const bad = event.status >= 400;
  const status = `${event.status}${event.error ? " " + event.error : ""}`;
  const row = el("tr", {tabindex: "0", title: "open its waterfall"},
    el("td", {text: new Date().toLocaleTimeString()}),
    el("td", {text: String(event.route ?? "")}),
    el("td", {class: bad ? "bad" : "", text: status}),
    el("td", {text: String(event.channel ?? "")}),
    el("td", {text: event.turn_id === undefined ? "" : String(event.turn_id)}),
    el("td", {text: fmt(event.llm_ttft)}));
  if (event.channel && event.channel.endsWith("/" + state.channel)) row.classList.add("mine");
  const open = () => {
    for (const r of $("live-rows").children) r.classList.toggle("open", r === row);
    const title = el("h3", {text: `${event.route} · ${status} · ${event.channel || "no channel"} · ` +
      `turn_id ${event.turn_id ?? "-"} · ${event.model || ""} via ${event.provider || "-"}`});
    const waterfall = el("div", {class: "waterfall"});
    $("live-waterfall").replaceChildren(title, waterfall);
    drawWaterfall(waterfall, event, null);
    countBars();
  };
  row.addEventListener("click", open);
  row.addEventListener("keydown", (e) => {
    if (e.key === "Enter") open();
  });
  const rows = $("live-rows");
  rows.prepend(row);
  while (rows.children.length > LIVE_ROWS) rows.lastChild.remove();
  // a turn of this page's that ended with no clock (barged in, superseded): the feed's
  const turn = state.mine.get(event.request_id);
  if (turn) {
    state.mine.delete(event.request_id);
    if (!turn.clock) {
      turn.clock = event;
      if (turn.ended) turn.draw();
    }
  }
}

// ---------------------------------------------------------------- wiring

function start() {
  $("channel").textContent = state.channel;
  $("key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
    else sessionStorage.removeItem(KEY_STORE);
    connect();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    state.key = "";
    $("key").value = "";
    if (state.live) state.live.abort();
    say("Key forgotten.");
  });
  $("route").addEventListener("change", showStages);
  $("send").addEventListener("click", () => send("send"));
  $("append").addEventListener("click", () => send("append"));
  $("interrupt").addEventListener("click", () => send("interrupt"));
  $("barge-in").addEventListener("click", bargeIn);
  $("reset").addEventListener("click", () => {
    if (state.current) bargeIn();
    state.history = [];
    state.nextTurn = 0;
    state.channel = newChannel();
    $("channel").textContent = state.channel;
    renderHistory();
    say(`New conversation on channel ${state.channel}.`);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      if (!state.current) send("send");
    }
  });
  buttons();
  connect();
}

start();
