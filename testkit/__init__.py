"""Test support for gradyard's tests and benchmarks; not part of the installed product.

Real servers (moto's S3 server, a fault-injecting S3 proxy), a Ray cluster
started with Ray's CLI, fault callbacks that tests pass in explicitly, data
files in their real formats, process clean-up.  Everything binds to loopback.
"""

from testkit.cluster import RayCluster
from testkit.s3_fault_proxy import FaultProxy
from testkit.servers import MotoServer, free_port, wait_for_port

__all__ = ["FaultProxy", "MotoServer", "RayCluster", "free_port", "wait_for_port"]
