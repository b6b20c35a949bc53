"""Real PACS peers for integration tests: Orthanc and DCMTK's dcmqrscp.

Each peer runs as a child process on free ports with its own temporary storage,
is loaded with data through DCMTK ``storescu`` and is stopped by SIGTERM to the
recorded PID.  See ``/work/shared/PEERS.md`` for the traps these classes avoid.
"""

from tests.peers.common import (
    FindSession,
    InstanceInfo,
    LoadResult,
    PeerProcess,
    PeerStartError,
    StoreReport,
    StorescpPeer,
    c_echo,
    c_find,
    dcmtk_available,
    dcmtk_env,
    dcmtk_tool,
    free_port,
    read_instance_info,
    store_files,
    wait_for_echo,
    wait_for_http,
    wait_until,
)
from tests.peers.dcmqrscp import DcmqrscpPeer
from tests.peers.orthanc import OrthancPeer

__all__ = [
    "DcmqrscpPeer",
    "FindSession",
    "InstanceInfo",
    "LoadResult",
    "OrthancPeer",
    "PeerProcess",
    "PeerStartError",
    "StoreReport",
    "StorescpPeer",
    "c_echo",
    "c_find",
    "dcmtk_available",
    "dcmtk_env",
    "dcmtk_tool",
    "free_port",
    "read_instance_info",
    "store_files",
    "wait_for_echo",
    "wait_for_http",
    "wait_until",
]
