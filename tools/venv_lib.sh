# Shared by tools/setup_*.sh (sourced, not run): each runtime lives in its own venv, built once
# and rebuilt from scratch whenever its check fails (a half-built venv fails it too; pip's cache
# keeps rebuilds short).
#
#   venv_setup LABEL VENV CHECK_PY INSTALL_FN   skip if VENV's python runs CHECK_PY with exit 0,
#                                               else fresh venv + newest pip + INSTALL_FN VENV
#   pins_check PINS [IMPORTS] [ABSENT]          CHECK_PY: every "pkg==version" in PINS installed
#                                               (a local "+cpu" suffix ignored), every module in
#                                               IMPORTS importable, none in ABSENT findable
#   print_versions LABEL VENV PKG...            one line "LABEL: pkg version ..." from VENV

venv_setup() {
  local label="$1" venv="$2" check="$3" install="$4"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
    echo "$label: already set up in $venv"
    return 0
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$install" "$venv"
  if ! "$venv/bin/python" -c "$check"; then
    echo "$label: $venv fails its check after installing" >&2
    return 1
  fi
}

pins_check() {
  cat <<PY
import importlib, importlib.metadata as m, importlib.util as u, sys
pins = dict(p.split("==") for p in "$1".split())
if any(m.version(k).split("+")[0] != v for k, v in pins.items()):
    sys.exit(1)
for mod in "${2:-}".split():
    importlib.import_module(mod)
sys.exit(1 if any(u.find_spec(p) for p in "${3:-}".split()) else 0)
PY
}

print_versions() {
  local label="$1" venv="$2"
  shift 2
  "$venv/bin/python" -c "import importlib.metadata as m, sys; print('$label:', *(f'{p} {m.version(p)}' for p in sys.argv[1:]))" "$@"
}
