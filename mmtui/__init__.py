"""mmtui: the wizard and the command lines.

A conversion's command line answers Ctrl-C with one line and status 130 at every moment:
`runner.guarded` does it while planning and writing; before that (imports, parsing the
command line), nothing has been written, so the process just says so and exits.
"""

from __future__ import annotations

import os
import signal
import sys


def _cancelled_before_work(signum: int, _frame: object) -> None:
    sys.stderr.write(f"{os.path.basename(sys.argv[0])}: cancelled; nothing was written\n")
    os._exit(128 + signum)


_prog = os.path.basename(sys.argv[0])
_converting = _prog in ("mm-convert", "convert-ckpt") or (_prog == "mmtui" and "--replay" in sys.argv)
if _converting and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _cancelled_before_work)
