"""Fail unless the installed diffaccel._C holds SASS (cubin) for each arch given, e.g. 80 89 90a
(and, with --cutlass, unless it was built with the CUTLASS sm_90a W8A8 GEMMs)."""
import os
import re
import subprocess
import sys

import diffaccel._C as ext
import triton

args = sys.argv[1:]
want_cutlass = "--cutlass" in args
archs = [a for a in args if a != "--cutlass"] or ["80", "89", "90a"]
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = subprocess.run([cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True)
if out.returncode != 0:
    sys.exit(f"cuobjdump --list-elf {ext.__file__} failed: {out.stderr.strip() or out.stdout.strip()}")
found = set(re.findall(r"\.sm_(\d+[a-z]?)\.cubin", out.stdout))
missing = [a for a in archs if a not in found]
print(f"{ext.__file__}: SASS for sm_{', sm_'.join(sorted(found)) or 'none'}")
if missing:
    sys.exit(f"diffaccel._C lacks SASS for sm_{', sm_'.join(missing)}")
if want_cutlass and not ext.cutlass_sm90():
    sys.exit("diffaccel._C was built without the CUTLASS sm_90a W8A8 GEMMs (no CUTLASS headers at build time?)")
