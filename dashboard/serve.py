"""Start the dashboard warm: ``python -m dashboard.serve [streamlit options]`` (what ``bash run.sh
dashboard`` runs).

Before the server takes visitors, this process imports the library and computes what the first page
shows (``session.warm_up``: the default models, their sweeps of the default sample). Streamlit then runs in
this same process, so its caches already hold them and the first visitor's page draws in a few seconds
instead of waiting for imports, model loading and sweeps. ``streamlit run dashboard/app.py`` still works;
it only starts cold. ``EQUISHIFT_WARM_UP=0`` skips the warm-up.

It also keeps uploaded weights from outliving the server (``upload_housekeeping``) and prints a line for
each sweep the server computes.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

APP = Path(__file__).resolve().parent / "app.py"
_ROOT = APP.parents[1]


def _quiet_bare_mode() -> None:
    # Streamlit caches used before the server exists log "missing ScriptRunContext" for every call; the
    # warm-up runs without a page on purpose.
    for name in ("streamlit.runtime.scriptrunner_utils.script_run_context", "streamlit.runtime.caching"):
        logging.getLogger(name).setLevel(logging.ERROR)


def warm(log=print) -> None:
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    _quiet_bare_mode()
    t0 = time.perf_counter()
    log("equishift: warming up (loading the default models and sweeping the sample image) …", flush=True)
    from dashboard import session

    steps = session.warm_up(log=log)
    log(f"equishift: warm-up done in {time.perf_counter() - t0:.1f} s ({', '.join(steps) or 'nothing'}).",
        flush=True)


def _log_to_console() -> None:
    """equishift's INFO lines (each sweep the server computes: model, image, grid, seconds) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s equishift: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("equishift")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


UPLOAD_CLEAN_EVERY_S = 3600.0      # uploaded weights untouched for a day are removed, checked every hour
UPLOAD_MAX_AGE_S = 24 * 3600.0


def upload_housekeeping(every_s: float = UPLOAD_CLEAN_EVERY_S, max_age_s: float = UPLOAD_MAX_AGE_S) -> threading.Event:
    """Uploaded weights do not outlive the server: folders left by servers that were killed are removed
    now, this server's folder (made now, private) is removed when it stops, and its entries untouched for
    ``max_age_s`` are removed every ``every_s``. Returns the event that stops the periodic clean-up."""
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from dashboard import sources

    for d in sources.clean_stale_uploads():
        logging.getLogger("equishift.dashboard").info("removed %s, left by a server that no longer runs", d)
    sources.upload_dir()
    atexit.register(sources.clean_uploads)
    stop = threading.Event()

    def periodic() -> None:
        while not stop.wait(every_s):
            sources.clean_uploads(max_age_s=max_age_s)

    threading.Thread(target=periodic, name="equishift-upload-cleanup", daemon=True).start()
    return stop


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _log_to_console()
    upload_housekeeping()
    if os.environ.get("EQUISHIFT_WARM_UP", "1") != "0":
        warm()
    from streamlit.web import cli

    return cli.main(["run", str(APP), *argv], prog_name="streamlit", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
