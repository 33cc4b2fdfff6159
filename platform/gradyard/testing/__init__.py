"""Real servers for tests and benchmarks: moto's S3 server and a fault-injecting proxy.

They live in the package (not in tests/) so the benchmarks use the very same
servers the tests do.  Every server binds to 127.0.0.1 only.
"""

from gradyard.testing.servers import MotoServer, free_port, wait_for_port
from gradyard.testing.s3_fault_proxy import FaultProxy

__all__ = ["MotoServer", "FaultProxy", "free_port", "wait_for_port"]
