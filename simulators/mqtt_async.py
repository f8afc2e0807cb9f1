"""paho-mqtt 2.x (MQTT v5) driven by an asyncio event loop, so one thread serves hundreds of connections.

paho exposes socket callbacks for exactly this: the loop watches each socket and calls ``loop_read`` /
``loop_write`` when it is ready, and a small task calls ``loop_misc`` for keep-alives and retries. This module
adds awaitable connect, acknowledged publishing (``drain``), and disconnects with or without the last will.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bpstream.shared.errors import TransientError

#: MQTT 5 PUBACK reason: the broker accepted the message but no subscription matched it.
_NO_MATCHING_SUBSCRIBERS = 0x10
_RESEND_AFTER_S = 0.5
_MAX_RESENDS = 120


class AsyncMqttConnection:
    """One MQTT v5 connection whose network I/O runs on the asyncio loop."""

    def __init__(self, client_id: str, host: str, port: int, *, will_topic: str | None = None,
                 will_payload: bytes = b"offline", username: str | None = None, password: str | None = None,
                 keepalive: int = 30, max_inflight: int = 32, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        if will_topic:
            self.client.will_set(will_topic, will_payload, qos=1, retain=True)
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc: asyncio.Task[None] | None = None
        self._connected: asyncio.Future[None] | None = None
        self._pending: set[int] = set()
        self._acked_early: set[int] = set()
        #: mid -> (topic, payload, qos, retain) of QoS > 0 publishes not yet acknowledged, to resend on 0x10.
        self._sent: dict[int, tuple[str, bytes, int, bool]] = {}
        self._tries: dict[tuple[str, bytes], int] = {}
        #: Messages given up after ``_MAX_RESENDS`` answers of 0x10 (nobody subscribed for a minute).
        self.undelivered = 0
        self._resends_scheduled = 0
        #: PUBACKs with reason 0x10 (no matching subscribers): the broker took the message but delivered it to
        #: nobody (Mosquitto after a restart, before the bridges' shared subscription is back); resent.
        self.no_subscribers = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = asyncio.Event()
        self.is_connected = False
        self.acked = 0
        self.disconnects = 0

    # ---- paho callbacks (run on the loop thread) -------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock, self._read, client, sock)
        self._misc = self._loop.create_task(self._misc_loop())

    @staticmethod
    def _read(client: mqtt.Client, sock: Any) -> None:
        # A TLS socket may hold decrypted bytes the OS no longer reports as readable: read them too.
        client.loop_read()
        pending = getattr(sock, "pending", None)
        while pending is not None and pending() > 0 and client.loop_read() == mqtt.MQTT_ERR_SUCCESS:
            pass

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        fut = self._connected
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(TransientError(f"MQTT broker refused the connection: {reason}", reason="mqtt_refused"))
        else:
            self.is_connected = True
            fut.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self.is_connected = False
        self.disconnects += 1
        self._closed.set()
        fut = self._connected
        if fut is not None and not fut.done():
            fut.set_exception(TransientError(f"MQTT connection closed: {reason}", reason="mqtt_disconnected"))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        sent = self._sent.pop(mid, None)
        # (A retained message is kept by the broker for later subscribers: 0x10 is normal for it.)
        if (getattr(reason, "value", 0) == _NO_MATCHING_SUBSCRIBERS and sent is not None and not sent[3]
                and self._loop is not None):
            # Not delivered: keep it and publish it again shortly (a gateway's duty; see docs/RELIABILITY.md).
            self.no_subscribers += 1
            self._pending.discard(mid)
            tries = self._tries[sent[:2]] = self._tries.get(sent[:2], 0) + 1
            if tries > _MAX_RESENDS:
                del self._tries[sent[:2]]
                self.undelivered += 1
                if not self._pending and not self._resends_scheduled:
                    self._idle.set()
                return
            self._resends_scheduled += 1
            self._idle.clear()
            self._loop.call_later(_RESEND_AFTER_S, self._resend, sent)
            return
        if sent is not None:
            self._tries.pop(sent[:2], None)
        if mid in self._pending:
            self._pending.discard(mid)
            self.acked += 1
        else:  # acknowledged before publish() returned its mid to us
            self._acked_early.add(mid)
        if not self._pending and not self._resends_scheduled:
            self._idle.set()

    def _resend(self, sent: tuple[str, bytes, int, bool]) -> None:
        self._resends_scheduled -= 1
        self.publish(*sent)
        if not self._pending and not self._resends_scheduled:
            self._idle.set()

    async def _misc_loop(self) -> None:
        while self.client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:  # noqa: ASYNC110 (periodic keep-alive tick)
            await asyncio.sleep(1.0)

    # ---- API -------------------------------------------------------------------------------------
    async def connect(self, within_s: float = 10.0) -> None:
        """Open the connection (first time or again after a disconnect) and wait for CONNACK."""
        self._loop = asyncio.get_running_loop()
        self._connected = self._loop.create_future()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300
        try:
            # paho's socket callbacks must run on this loop's thread, so the TCP connect runs here too.
            if self.disconnects:
                self.client.reconnect()
            else:
                self.client.connect(self.host, self.port, self.keepalive, clean_start=False, properties=props)
        except OSError as exc:
            raise TransientError(f"cannot reach MQTT broker {self.host}:{self.port}: {exc}",
                                 reason="mqtt_unreachable") from exc
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        try:
            await asyncio.wait_for(asyncio.shield(self._connected), within_s)
        except TimeoutError as exc:
            raise TransientError(f"no CONNACK from {self.host}:{self.port} within {within_s} s",
                                 reason="mqtt_timeout") from exc

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            self._sent[info.mid] = (topic, payload, qos, retain)
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self.acked += 1
            else:
                self._pending.add(info.mid)
                self._idle.clear()

    @property
    def unacked(self) -> int:
        """Publishes not acknowledged, or acknowledged only as delivered to nobody and given up."""
        return len(self._pending) + self.undelivered

    async def drain(self, within_s: float = 30.0) -> bool:
        """Wait until the broker acknowledged every QoS 1 publish; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def disconnect(self, *, send_will: bool = False) -> None:
        """Close the connection; with ``send_will`` the broker publishes the last will (MQTT 5 reason 0x04)."""
        if not self.client.is_connected():
            return
        code = ReasonCode(PacketTypes.DISCONNECT, identifier=4 if send_will else 0)
        self._closed.clear()
        self.client.disconnect(reasoncode=code)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), 2.0)
