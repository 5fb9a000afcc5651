# Sourced by scripts/serve, scripts/test and scripts/bench: make .venv and install llmgate.
# Re-installs only when setup.cfg or pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "llmgate needs Python 3.11 or newer (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
EXTRAS="${LLMGATE_EXTRAS:-}"
STAMP=".venv/.llmgate-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ setup.cfg -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "llmgate: installing into .venv ..." >&2
  pip=(.venv/bin/python -m pip install --disable-pip-version-check)
  # Quiet unless it fails: build back-ends print warnings nobody can act on here.
  "${pip[@]}" --upgrade pip > .venv/install.log 2>&1 || true  # an old pip still works
  if ! "${pip[@]}" -e ".${EXTRAS:+[$EXTRAS]}" >> .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "llmgate: installing failed (log above, also in .venv/install.log)" >&2
    exit 1
  fi
  touch "$STAMP"
fi
