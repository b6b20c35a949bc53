"""The gateway's runtime state: one object built at start-up and closed at shutdown.

Nothing here is global: ``create_app`` makes a ``Gateway`` in its lifespan and
hangs it on ``app.state``, so every test can build its own.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from pynetdicom import _config

from app.cache import InstanceCache
from app.config import DimseProfile, PacsNode, Settings
from app.dimse.contexts import query_contexts
from app.dimse.pool import AssociationPool
from app.dimse.storeproc import StorageProcess, StorageTls
from app.errors import UnknownNode
from app.services.metadata import MetadataStore
from app.services.retrieve import Retriever

log = logging.getLogger(__name__)

# The contexts of a node with the default profile.
QUERY_CONTEXTS = query_contexts(DimseProfile())


def _quiet_pynetdicom() -> None:
    # pynetdicom formats every identifier for its log even when nobody listens:
    # about 1 ms per C-FIND and most of the per-answer cost of large answers.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def storage_tls(settings: Settings) -> StorageTls | None:
    """The storage SCP's TLS listener, if configured.  A node with ``tls = true`` must
    then store to it; without one, its C-MOVE sub-associations come in plain TCP."""
    tls_nodes = [n for n in settings.nodes if n.tls]
    if settings.storage_tls_port is None:
        movers = [n.name for n in tls_nodes if n.retrieve != "get"]
        if movers:
            log.warning(
                "nodes %s use DICOM TLS but the storage SCP has no storage_tls_port: "
                "their C-MOVE sub-associations arrive in plain TCP",
                ", ".join(movers),
            )
        return None
    assert settings.storage_tls_cert_file and settings.storage_tls_key_file  # validated
    plain_aes = {n.ae_title for n in settings.nodes if not n.tls}
    return StorageTls(
        port=settings.storage_tls_port,
        cert_file=str(settings.storage_tls_cert_file),
        key_file=str(settings.storage_tls_key_file),
        ca_file=str(settings.storage_tls_ca_file) if settings.storage_tls_ca_file else None,
        require_client_cert=settings.storage_tls_require_client_cert,
        tls_only_senders=frozenset(n.ae_title for n in tls_nodes) - plain_aes,
    )


class Gateway:
    """Pools and workers for every configured node."""

    def __init__(self, settings: Settings) -> None:
        _quiet_pynetdicom()
        self.settings = settings
        workers = sum(n.max_associations for n in settings.nodes) * 2 + 4
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dimse")
        self.pools: dict[str, AssociationPool] = {
            node.name: AssociationPool(
                node,
                calling_ae_title=settings.ae_title,
                contexts=query_contexts(node.profile),
                executor=self.executor,
            )
            for node in settings.nodes
        }
        self.cache = InstanceCache(settings.work_dir / "cache", max_bytes=settings.cache_max_bytes)
        self.metadata = MetadataStore(settings.metadata_memory_bytes)
        self.retriever = Retriever(
            ae_title=settings.ae_title,
            cache=self.cache,
            nodes={n.name: n for n in settings.nodes},
            pools=self.pools,
        )
        # Only configured PACS may store to us, each from its own host.
        senders: dict[str, list[str]] = {}
        for node in settings.nodes:
            senders.setdefault(node.ae_title, []).append(node.host)
        self.storage = StorageProcess(
            settings.ae_title,
            host=settings.storage_host,
            port=settings.storage_port,
            max_pdu=settings.storage_max_pdu,
            senders=senders,
            temp_dir=self.cache.temp_dir,
            on_arrivals=self.retriever.on_arrivals,
            log_level=settings.log_level,
            tls=storage_tls(settings),
        )
        self.retriever.storage = self.storage

    async def start(self) -> None:
        for pool in self.pools.values():
            pool.start()
        await asyncio.to_thread(self.storage.start)
        log.info(
            "gateway %s ready with nodes: %s",
            self.settings.ae_title,
            ", ".join(f"{n.name} ({n.ae_title}@{n.host}:{n.port})" for n in self.settings.nodes)
            or "none",
        )

    async def close(self) -> None:
        await self.retriever.shutdown()
        await asyncio.to_thread(self.storage.stop)
        for pool in self.pools.values():
            await pool.close()
        self.cache.close()
        self.executor.shutdown(wait=True, cancel_futures=False)

    def node(self, name: str | None) -> PacsNode:
        """The node called *name*, or the default node when *name* is None."""
        if name is None:
            node = self.settings.default_node
            if node is None:
                raise UnknownNode("(default)", [n.name for n in self.settings.nodes])
            return node
        found = self.settings.node(name)
        if found is None:
            raise UnknownNode(name, [n.name for n in self.settings.nodes])
        return found

    def pool(self, node: PacsNode) -> AssociationPool:
        return self.pools[node.name]
