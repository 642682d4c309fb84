"""A stand-in for ``python -m TCURLoRALib`` that misbehaves on purpose, for the job runner's tests.

``python -m fake_job SCENARIO ... --progress json``; scenarios:

- ``ansi``: writes a line in a non-UTF-8 code page (a user name in cp1252), then a JSON event; exits 0.
- ``env``: writes the values of the environment variables named after it as one JSON log event; exits 0.
- ``stubborn``: ignores SIGTERM and never looks at the cancel file; writes a line every 0.1 s for ever.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    scenario = argv[0]
    if scenario == "ansi":
        sys.stdout.flush()
        sys.stdout.buffer.write("C:\\Users\\Jos\u00e9 M\u00fcller\\case.nii.gz\n".encode("cp1252") + b"\xff\xfe\x81\n")
        sys.stdout.buffer.flush()
        print(json.dumps({"event": "done", "seconds": 0.0}), flush=True)
        return 0
    if scenario == "env":
        names = [name for name in argv[1:] if not name.startswith("--") and name != "json"]
        print(json.dumps({"event": "log", "message": json.dumps({name: os.environ.get(name) for name in names})}),
              flush=True)
        return 0
    if scenario == "stubborn":
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"event": "start", "task": "stubborn", "total": 1}), flush=True)
        while True:
            print("still here", flush=True)
            time.sleep(0.1)
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
