"""``run_webcam.py --serve``: lock the project folder, bind the port, print the one address, serve until stopped.

The address carries a random token, as Jupyter's does; uvicorn's own start-up lines and access log are silenced so
that this address is the only one printed. It listens on 127.0.0.1 unless --host says otherwise (then it warns).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

from features.locking import hold_lock
from pipeline.common.config import ServeConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)
APP_REQUIREMENTS = "requirements-app.txt"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); a busy port or an unknown address is one line."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this computer ({err.strerror}); leave --host out to "
                        "listen on 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} is busy (another server, or another program, uses it); pass --port N, "
                            "or --port 0 for any free one") from None
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); pass another --host or --port") from None
    sock.set_inheritable(True)
    return sock


def address(host: str, port: int, token: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else f"[{host}]" if ":" in host.strip("[]") else host
    return f"http://{shown}:{port}/?token={token}"


def serve(config: ServeConfig, *, ready=None) -> int:
    """Serve the page over ``config.project`` until Ctrl-C or SIGTERM. ``ready(url)`` is called once it listens."""
    config.check()
    try:
        import uvicorn

        from pipeline.app.project import Project
        from pipeline.app.routes import Settings, build_app
    except ImportError as err:
        raise UserError(f"--serve needs the app's packages ({err.name} is missing): pip install -r "
                        f"{APP_REQUIREMENTS}") from None
    from pipeline.backbones.catalog import check_name

    check_name(config.backbone)  # an unknown backbone is one line now, not when the page first trains
    project_dir = Path(config.project).expanduser()
    busy = lambda holder: UserError(f"--project {project_dir} is open in another server ({holder}); use its page, "
                                    "or stop it first (one server per project folder)")
    with hold_lock(project_dir, f"pid {os.getpid()} (run_webcam.py --serve)", busy):
        project = Project(project_dir).open()
        sock = bind(config.host, config.port)
        port = sock.getsockname()[1]
        token = secrets.token_hex(24)
        settings = Settings(backbone=config.backbone, weights=config.weights, seed=config.seed, host=config.host,
                            port=port)
        app = build_app(project, token, settings)
        if not is_loopback(config.host):
            log.warning("WARNING: --host %s: the page is reachable from the network (anyone with the token can use "
                        "it), and browsers allow webcam capture only on 127.0.0.1, localhost or HTTPS", config.host)
        log.info("project %s: %d classes (images in %s)", project_dir, len(project.summary()["classes"]),
                 project.images)
        url = address(config.host, port, token)
        print(url, flush=True)
        if ready is not None:
            ready(url)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        server.run(sockets=[sock])
    print("stopped", file=sys.stderr)
    return 0

