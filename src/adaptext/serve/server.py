"""Start a server: find the adapters named on the command line, load them, bind, serve."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from adaptext.errors import AdaptextError
from adaptext.serve.app import ServeOptions, create_app
from adaptext.serve.registry import Registry

META_FILE = "adaptext.json"


def expand(specs: list[str]) -> tuple[list[tuple[str | None, Path]], list[Path]]:
    """``[NAME=]PATH`` items: an adapter directory, or a directory of them; returns adapters and roots."""
    adapters: list[tuple[str | None, Path]] = []
    roots: list[Path] = []
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        if not sep:
            name, path_text = "", spec
        path = Path(path_text).expanduser()
        if not path.is_dir():
            raise AdaptextError(
                f"--adapters {spec}: no such directory; pass adapter directories written by adaptext train"
            )
        roots.append(path.resolve())
        if (path / META_FILE).is_file():
            adapters.append((name or None, path.resolve()))
            continue
        if name:
            raise AdaptextError(
                f"--adapters {spec}: NAME= applies to one adapter directory, and {path} holds no {META_FILE}"
            )
        found = sorted(p.resolve() for p in path.iterdir() if (p / META_FILE).is_file())
        if not found:
            raise AdaptextError(
                f"--adapters {spec}: neither an adapter directory nor a folder of them (no {META_FILE} found)"
            )
        adapters.extend((None, p) for p in found)
    return adapters, roots


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before serving so that port 0 gets a free port we can print."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AdaptextError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    specs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_dirs: list[str] = (),
    options: ServeOptions | None = None,
    device: str | None = None,
    precision: str = "auto",
    batch_size: int = 64,
    log_level: str = "warning",
) -> None:
    import uvicorn

    options = options or ServeOptions()
    adapters, roots = expand(specs)
    for extra in allow_dirs:
        if not Path(extra).expanduser().is_dir():
            raise AdaptextError(f"--allow-dir {extra}: no such directory")
    registry = Registry([*roots, *allow_dirs], device=device, precision=precision, batch_size=batch_size)
    sock = bind(host, port)
    for name, folder in adapters:
        adapter = registry.load(folder, name)
        print(f"loaded {adapter.name}: {adapter.meta['method']}, {len(adapter.class_names)} labels", flush=True)
    bases = len(registry.bases)
    alone = sum(1 for a in registry.adapters.values() if a.runner not in registry.bases.values())
    if not is_loopback(host) and options.token is None:
        print(f"warning: serving on {host} without --token: anyone who can reach it may classify", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {len(registry.adapters)} adapter(s) on {bases} shared base model(s)"
        + (f" + {alone} standalone" if alone else "")
        + f" at http://{shown}:{sock.getsockname()[1]}/ (API docs at /docs); Ctrl+C stops",
        flush=True,
    )
    config = uvicorn.Config(create_app(registry, options), log_level=log_level, access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
