"""Peers on the LAN (--peers auto): llmserve servers that announce themselves over mDNS
(llmserve/discovery.py), watched for as long as the app runs. A request for a model no local
backend has goes to an alive peer that announces it, with --peer_api_key.

A peer is dropped when it withdraws its announcement (mDNS goodbye at shutdown) and set aside
while its /health does not answer (checked every PEER_CHECK_S seconds), so one that was killed
stops getting requests within seconds; it is taken back when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

import httpx
from zeroconf import InterfaceChoice, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from llmserve.discovery import SERVICE_TYPE, Node, _interface_ipv4, node_from_info

logger = logging.getLogger(__name__)
PEER_CHECK_S = 1.0


class PeerWatcher:
    """The peers seen on the network: resolved nodes by service name, and which answer."""

    def __init__(self, own_port: int, host: str = ""):
        self.own_port = own_port
        # NOTE: a server bound to loopback can only reach peers on this machine (which
        # announce on loopback, discovery.py): browse there only
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = host == "localhost"
        self._interfaces: Any = ["127.0.0.1"] if loopback else InterfaceChoice.All
        self.nodes: dict[str, Node] = {}
        self.alive: set[str] = set()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._local = set(_interface_ipv4()) | {"127.0.0.1", "::1"}

    def start(self) -> None:
        """Browse in the background (a failure to use multicast is one warning)."""
        try:
            self._zc = AsyncZeroconf(interfaces=self._interfaces)
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE,
                                                handlers=[self._on_change])
        except Exception as exc:  # NOTE: no multicast (containers, firewalls): keep serving
            logger.warning("--peers auto: cannot browse the LAN over mDNS (%s)", exc)
            return
        self._checker = asyncio.get_running_loop().create_task(self._check())

    def _is_self(self, node: Node) -> bool:
        return node.port == self.own_port and any(
            a in self._local or ipaddress.ip_address(a).is_loopback for a in node.addresses)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            if self.nodes.pop(name, None) is not None:
                logger.info("peer %s withdrew", name)
            self.alive.discard(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(self._zc.zeroconf, 1500):
            node = node_from_info(info)
            if not self._is_self(node):
                if name not in self.nodes:
                    logger.info("peer %s at %s: %s", node.name, node.url, ",".join(node.models))
                self.nodes[name] = node
                self.alive.add(name)

    async def _check(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                await asyncio.sleep(PEER_CHECK_S)
                for name, node in list(self.nodes.items()):
                    root = node.url.removesuffix(node.api_base)
                    ok = False
                    with contextlib.suppress(httpx.HTTPError):
                        ok = (await client.get(f"{root}/health")).status_code < 500
                    if ok:
                        self.alive.add(name)
                    elif name in self.alive:
                        logger.info("peer %s does not answer: set aside", name)
                        self.alive.discard(name)

    def find(self, model: str) -> Node | None:
        """An alive peer announcing model (exact name, then case-insensitive)."""
        nodes = [n for k, n in sorted(self.nodes.items()) if k in self.alive]
        for node in nodes:
            if model in node.models:
                return node
        folded = model.casefold()
        return next((n for n in nodes if folded in {m.casefold() for m in n.models}), None)

    def models(self) -> list[tuple[str, Node]]:
        """(model, node) for every model alive peers announce."""
        return [(m, n) for k, n in sorted(self.nodes.items()) if k in self.alive
                for m in n.models]

    async def stop(self) -> None:
        """Stop browsing."""
        for task in [*self._tasks, *([self._checker] if self._checker else [])]:
            task.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._zc.async_close(), timeout=3)
