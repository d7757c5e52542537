"""Generated code of Triton's KServe V2 inference protocol (proto package ``inference``): ``proto/generate.py``.

The modules add their descriptors to :data:`POOL`, not to protobuf's default pool: tritonclient ships its own
generated copy of the same protocol, and two files defining the same symbols in one pool refuse to load, so a process
(a test, a notebook) could not import both. Code that resolves descriptors by name (server reflection) must look here.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
