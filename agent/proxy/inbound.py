"""inbound.py: connections into a local workload — HBONE on 15008, plaintext on 15006.

Decide, then do: the destination's policy decides on the snapshot read once at accept; only
then is the workload dialled from inside its own netns (``Delivery``, agent/proxy/delivery.py).
Every delivered connection is tracked in the registry, so a later policy change can close it. A denied HBONE stream gets
403 and a denied plaintext connection a TCP reset; both are logged with policy and rule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from agent.identity import IdentityError, IdentityManager
from agent.observe.record import ConnRecord
from agent.proxy import ProxyError
from agent.proxy.delivery import Delivery, Denied, OrigDst
from agent.proxy.hbone import ConnectRequest, HboneError, serve_hbone
from agent.proxy.relay import RelayError, abort
from agent.state.snapshot import StateHolder
from controller.api import InvalidSpiffeId, Workload, parse_spiffe_id

log = logging.getLogger("nodemesh.agent.inbound")


@dataclass
class Inbound:
    delivery: Delivery
    identity: IdentityManager
    orig_dst: OrigDst

    @property
    def holder(self) -> StateHolder:
        return self.delivery.holder

    async def hbone(self, workload: Workload, stream: trio.SocketStream) -> None:
        """15008: terminate mTLS as the workload's identity and serve its CONNECT streams."""
        snap = self.holder.current
        uri = snap.identity_of(workload).uri
        try:
            ctx = self.identity.server_context(uri)
        except IdentityError as e:
            log.warning("refusing HBONE for %s: no certificate yet (%s)", uri, e)
            await stream.aclose()
            return
        tls = trio.SSLStream(stream, ctx, server_side=True)
        key = (workload.metadata.namespace, workload.metadata.name)
        await serve_hbone(tls, lambda req: self._connect(key, req, _peer_address(stream)))

    async def _connect(self, key: tuple[str, str], req: ConnectRequest, peer_ip: str) -> None:
        snap = self.holder.current
        workload = snap.workload(*key)
        source_ip = req.forwarded_for or peer_ip
        rec = ConnRecord("destination", source_ip, protocol="hbone", security="mutual_tls",
                         src_identity=req.peer_identity, dst_workload=workload,
                         src_workload=snap.workload_at(source_ip))
        tel = self.delivery.telemetry
        upstream = None
        piped = False
        try:
            ip, port = req.destination
            if workload is None or ip not in workload.spec.addresses:
                rec.flags, rec.error = "NR", f"{req.authority} is not served here"
                await req.reject(404)
                return
            rec.dst_identity = snap.identity_of(workload).uri
            try:
                source = parse_spiffe_id(req.peer_identity)
            except InvalidSpiffeId as e:
                rec.decision, rec.flags, rec.error = "deny", "DENY", f"peer is not a workload: {e}"
                await req.reject(403)
                return
            try:
                self.delivery.decide(snap, workload, port, source, source_ip, rec)
            except Denied:
                await req.reject(403)
                return
            try:
                upstream = await self.delivery.dial(workload, port, rec)
            except (OSError, trio.TooSlowError, ProxyError):
                await req.reject(503)
                return
            tunnel = await req.accept()
            tel.opened(rec)
            piped = True
            await self.delivery.pipe(tunnel, upstream, workload, port, source, source_ip, rec, snap)
        except (HboneError, RelayError, OSError) as e:
            rec.error = rec.error or str(e)
            if upstream is not None:
                await abort(upstream)
        except trio.Cancelled:
            if upstream is not None and not piped:   # the client reset the stream meanwhile
                rec.error = rec.error or "the client reset the stream before it was answered"
                with trio.CancelScope(shield=True):
                    await abort(upstream)
            raise
        finally:
            tel.closed(rec)

    async def plaintext(self, workload: Workload, stream: trio.SocketStream) -> None:
        """15006: plaintext from outside the mesh; refused under STRICT, authorized under PERMISSIVE."""
        snap = self.holder.current
        source_ip = _peer_address(stream)
        rec = ConnRecord("destination", source_ip, dst_workload=snap.workload(workload.metadata.namespace,
                                                                              workload.metadata.name))
        tel = self.delivery.telemetry
        try:
            if snap.mesh.spec.mtls == "STRICT":
                rec.decision, rec.flags, rec.reason = "deny", "DENY", "plaintext refused: mesh mtls is STRICT"
                log.info("refused plaintext %s -> %s/%s: mtls STRICT", source_ip,
                         workload.metadata.namespace, workload.metadata.name)
                await abort(stream)
                return
            _, port = await self.orig_dst(workload, stream)
            current = rec.dst_workload or workload
            try:
                self.delivery.decide(snap, current, port, None, source_ip, rec)
            except Denied:
                await abort(stream)
                return
            try:
                upstream = await self.delivery.dial(current, port, rec)
            except (OSError, trio.TooSlowError, ProxyError):
                await abort(stream)
                return
            tel.opened(rec)
            await self.delivery.pipe(stream, upstream, current, port, None, source_ip, rec, snap)
        except (ProxyError, OSError) as e:
            rec.error = rec.error or str(e)
            await abort(stream)
        finally:
            tel.closed(rec)


def _peer_address(stream) -> str:
    try:
        return stream.socket.getpeername()[0]
    except (OSError, AttributeError):
        return "0.0.0.0"
