"""The gateway's runtime state: one object built at start-up and closed at shutdown.

Nothing here is global: ``create_app`` makes a ``Gateway`` in its lifespan and
hangs it on ``app.state``, so every test can build its own.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from app.config import PacsNode, Settings
from app.dimse.find import VERIFICATION, QueryModel
from app.dimse.pool import AssociationPool
from app.errors import UnknownNode

log = logging.getLogger(__name__)

# Explicit VR first: it carries VRs for private and unknown attributes.  Implicit
# VR is the one syntax every PACS must accept (PS3.5 10.1).
_QR_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
QUERY_CONTEXTS = (
    (VERIFICATION, _QR_SYNTAXES),
    (QueryModel.STUDY_ROOT.value, _QR_SYNTAXES),
    (QueryModel.PATIENT_ROOT.value, _QR_SYNTAXES),
)


class Gateway:
    """Pools and workers for every configured node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        workers = sum(n.max_associations for n in settings.nodes) * 2 + 4
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dimse")
        self.pools: dict[str, AssociationPool] = {
            node.name: AssociationPool(
                node,
                calling_ae_title=settings.ae_title,
                contexts=QUERY_CONTEXTS,
                executor=self.executor,
            )
            for node in settings.nodes
        }

    async def start(self) -> None:
        for pool in self.pools.values():
            pool.start()
        log.info(
            "gateway %s ready with nodes: %s",
            self.settings.ae_title,
            ", ".join(f"{n.name} ({n.ae_title}@{n.host}:{n.port})" for n in self.settings.nodes)
            or "none",
        )

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
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
