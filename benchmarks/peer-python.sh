# Sourced by the compare scripts: sets $python to a python3 that imports torch (PEER_PYTHON first), or exits 2.
python=${PEER_PYTHON:-}
if [ -z "$python" ]; then
  for p in python3 /usr/bin/python3; do "$p" -c "import torch" 2>/dev/null && { python=$p; break; }; done
fi
[ -n "$python" ] || { echo "no python3 with PyTorch found (Debian: apt-get install python3-torch, or set PEER_PYTHON)" >&2; exit 2; }
