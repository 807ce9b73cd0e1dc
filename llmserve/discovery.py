"""LAN discovery over mDNS/DNS-SD (zeroconf): the server's announcement and `discover()`.

The server announces `<host>-<port>._llmserve._tcp.local.` with TXT records (version, active
model, models, state, whether a key is required, API base path), refreshes them when the model
changes and withdraws them at shutdown. Everything uses zeroconf's asyncio API, so the event
loop never blocks; when multicast is unavailable the server logs one warning and carries on.

A server bound to a loopback address announces on the loopback interface only: processes on
the same machine find it, the LAN does not (it could not connect anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_llmserve._tcp.local."
API_BASE = "/v1"
_TXT_MAX = 255  # one TXT string holds at most 255 bytes (RFC 6763)


@dataclass(frozen=True)
class Node:
    """An llmserve server found on the network."""

    name: str
    addresses: list[str]
    port: int
    version: str = ""
    model: str | None = None
    models: list[str] = field(default_factory=list)
    state: str = ""
    auth: bool = False
    api_base: str = API_BASE

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client (`http://addr:port/v1`)."""
        addr = self.addresses[0] if self.addresses else "127.0.0.1"
        host = f"[{addr}]" if ":" in addr else addr
        return f"http://{host}:{self.port}{self.api_base}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with `url`."""
        return {**asdict(self), "url": self.url}


def txt_records(
    *, version: str, model: str | None, models: list[str], state: str, auth: bool
) -> dict[str, str]:
    """The TXT properties the server announces (the model list is cut to fit 255 bytes)."""
    kept: list[str] = []
    for name in models:
        candidate = ",".join([*kept, name])
        if len(f"models={candidate}".encode()) > _TXT_MAX:
            break
        kept.append(name)
    return {
        "version": version,
        "model": (model or "")[: _TXT_MAX - 6],
        "models": ",".join(kept),
        "state": state,
        "auth": "1" if auth else "0",
        "api": API_BASE,
    }


def node_from_info(info: AsyncServiceInfo) -> Node:
    """Turn a resolved service into a Node."""
    props = {k: v or "" for k, v in info.decoded_properties.items()}
    suffix = "." + SERVICE_TYPE
    name = info.name[: -len(suffix)] if info.name.endswith(suffix) else info.name
    return Node(
        name=name,
        addresses=info.parsed_addresses(),
        port=info.port or 0,
        version=props.get("version", ""),
        model=props.get("model") or None,
        models=[m for m in props.get("models", "").split(",") if m],
        state=props.get("state", ""),
        auth=props.get("auth") == "1",
        api_base=props.get("api") or API_BASE,
    )


def _interface_ipv4() -> list[str]:
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.append(ip.ip)
    return out


async def announce_addresses(host: str) -> list[str]:
    """The addresses to put in the announcement for a server bound to `host`."""
    if host in ("", "0.0.0.0", "::"):
        every = _interface_ipv4()
        lan = [a for a in every if not ipaddress.ip_address(a).is_loopback]
        return lan or every
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(i[4][0]) for i in infos))


def _instance_name(port: int) -> str:
    host = socket.gethostname().split(".")[0] or "llmserve"
    return f"{host[: 63 - len(str(port)) - 1]}-{port}"


class Announcer:
    """Keeps the server's DNS-SD record up to date while the app runs."""

    def __init__(
        self, host: str, port: int, properties: Callable[[], dict[str, str]],
        *, interval: float = 1.0,
    ):
        self.host = host
        self.port = port
        self._properties = properties
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._addresses: list[str] = []
        self.registered = asyncio.Event()

    @property
    def name(self) -> str | None:
        """The registered service name (zeroconf may add a suffix on a conflict)."""
        return self._info.name if self._info else None

    def start(self) -> None:
        """Announce in the background (startup never waits for mDNS probing)."""
        self._task = asyncio.create_task(self._run(), name="llmserve-announce")

    async def _run(self) -> None:
        try:
            await self._register()
        except Exception as exc:
            # NOTE: no multicast (containers, no network, firewalls): one warning, keep serving.
            logger.warning("LAN discovery disabled: cannot announce over mDNS (%s)", exc)
            await self._close_zeroconf()
            return
        self.registered.set()
        logger.info("announced %s on %s", self.name, ", ".join(self._addresses))
        while True:
            # NOTE: polled, so the record follows every state change (load, switch, failure,
            # files added) without hooks in the model manager; at most `interval` behind.
            props = self._properties()
            if self._info is not None and props != self._info.decoded_properties:
                try:
                    self._info = self._service_info(props)
                    await (await self._zc_or_fail().async_update_service(self._info))
                except Exception as exc:
                    logger.warning("updating the mDNS announcement failed: %s", exc)
            await asyncio.sleep(self._interval)

    def _zc_or_fail(self) -> AsyncZeroconf:
        if self._zc is None:
            raise RuntimeError("zeroconf is not running")
        return self._zc

    async def _register(self) -> None:
        if self.port == 0:
            raise ValueError("port 0 (ephemeral) cannot be announced")
        self._addresses = await announce_addresses(self.host)
        if not self._addresses:
            raise ValueError(f"no address found for {self.host!r}")
        v6 = any(":" in a for a in self._addresses)
        loopback = all(ipaddress.ip_address(a).is_loopback for a in self._addresses)
        interfaces: Any = self._addresses if loopback else InterfaceChoice.All
        self._zc = AsyncZeroconf(
            interfaces=interfaces, ip_version=IPVersion.All if v6 else IPVersion.V4Only
        )
        self._info = self._service_info(self._properties())
        await (await self._zc.async_register_service(self._info, allow_name_change=True))

    def _service_info(self, props: dict[str, str]) -> AsyncServiceInfo:
        if self._info is not None:
            name, server = self._info.name, self._info.server
        else:
            name = f"{_instance_name(self.port)}.{SERVICE_TYPE}"
            server = f"llmserve-{_instance_name(self.port)}.local."
        return AsyncServiceInfo(
            SERVICE_TYPE, name, port=self.port, properties=props, server=server,
            parsed_addresses=self._addresses,
        )

    async def stop(self) -> None:
        """Withdraw the announcement (goodbye packets) and close the sockets."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._zc is not None and self._info is not None and self.registered.is_set():
            try:
                await asyncio.wait_for(
                    await self._zc.async_unregister_service(self._info), timeout=3
                )
            except Exception as exc:
                logger.warning("withdrawing the mDNS announcement failed: %s", exc)
        await self._close_zeroconf()

    async def _close_zeroconf(self) -> None:
        if self._zc is not None:
            zc, self._zc = self._zc, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(zc.async_close(), timeout=3)


async def async_discover(timeout: float = 3.0) -> list[Node]:
    """Browse the network for `timeout` seconds and return the llmserve nodes found."""
    aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All)
    found: dict[str, Node] = {}
    pending: set[asyncio.Task[None]] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(aiozc.zeroconf, 1500):
            found[name] = node_from_info(info)

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)
            return
        task = asyncio.create_task(resolve(name))
        pending.add(task)
        task.add_done_callback(pending.discard)

    browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
        if pending:
            await asyncio.wait(set(pending), timeout=1.5)
    finally:
        await browser.async_cancel()
        for task in pending:
            task.cancel()
        await aiozc.async_close()
    return sorted(found.values(), key=lambda n: (n.name, n.port))


def discover(timeout: float = 3.0) -> list[Node]:
    """Blocking `async_discover` for scripts (inside an event loop, await async_discover)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(async_discover(timeout))
    raise RuntimeError("discover() blocks; inside an event loop use `await async_discover()`")
