"""``python -m sdtune.ui``: serve the web app on this machine (http://127.0.0.1:7860/ by default).

Binds localhost. Another ``--host`` (the LAN, a container's 0.0.0.0) serves other machines and so
refuses to start without a token (``--token`` or ``SDTUNE_UI_TOKEN``) that every request must carry.
Prints ``sdtune ui: http://HOST:PORT/`` (with ``?token=`` when set) once it accepts connections;
``--port 0`` picks a free port. One server per outputs folder (a lock in ``<outputs>/.sdtune-ui/``).
Ctrl-C stops the server, not the jobs: they run in their own sessions and the next start re-attaches
them.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import quote

from sdtune.ui.security import is_local_host

DEFAULT_PORT = 7860


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdtune.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", default="outputs", help="the outputs folder: runs/ and the queue (default ./outputs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    parser.add_argument("--token", default=os.environ.get("SDTUNE_UI_TOKEN") or None,
                        help="a secret every request must carry (default: $SDTUNE_UI_TOKEN)")
    parser.add_argument("--devices", default="auto",
                        help="job queues: auto (one queue, CUDA_VISIBLE_DEVICES as it is), cpu, or GPU ids 0,1 "
                             "(one job at a time on each)")
    return parser.parse_args(argv)


def problem(args: argparse.Namespace) -> str | None:
    """Why the server must not start with these arguments, or None."""
    if not is_local_host(args.host) and not args.token:
        return (f"--host {args.host} serves other machines, so every request must carry a token. Fix: add "
                "--token <secret> (or set SDTUNE_UI_TOKEN), or leave --host out to serve this machine only.")
    if not 0 <= args.port <= 65535:
        return f"--port {args.port} is no port. Fix: a number from 1 to 65535, or 0 for a free one."
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not devices or any(d not in ("auto", "cpu") and not d.isdigit() for d in devices):
        return f"--devices {args.devices!r}: give auto, cpu, or GPU ids such as 0,1."
    return None


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    return sock


def lock_outputs(outputs: Path):
    """Hold ``<outputs>/.sdtune-ui/server.lock`` while serving (two servers would run two queues)."""
    folder = outputs / ".sdtune-ui"
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "server.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    why = problem(args)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        import uvicorn
        from starlette.applications import Starlette  # noqa: F401
    except ImportError as err:
        print(f"error: the web app needs starlette and uvicorn ({err}). Fix: pip install sdtune[ui]", file=sys.stderr)
        return 2
    from sdtune.ui.server import create_app, warm_up  # deferred: after the friendly message for a missing starlette

    outputs = Path(args.outputs).expanduser().resolve()
    lock = lock_outputs(outputs)
    if lock is None:
        print(f"error: another sdtune ui already serves {outputs} (it holds {outputs}/.sdtune-ui/server.lock). "
              "Fix: use that one, or stop it first.", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}). Fix: another --port "
              "(or --port 0 for a free one).", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown = f"[{args.host.strip('[]')}]" if ":" in args.host.strip("[]") else args.host
    url = f"http://{shown}:{port}/" + (f"?token={quote(args.token)}" if args.token else "")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with `nohup ... &`, the server ignores SIGINT, and so would its jobs (an ignored signal stays
        # ignored across exec, and a run keeps a signal its caller ignores ignored): Stop would do nothing. A
        # handled signal is reset to the default in a child; terminal Ctrl-C never reaches a background server.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app = create_app(outputs, token=args.token, local_only=is_local_host(args.host), devices=devices)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"sdtune ui: {url}", flush=True)
                warm_up()  # after the line: importing torch holds the interpreter for seconds

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    finally:
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
