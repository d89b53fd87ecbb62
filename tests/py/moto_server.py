"""moto's S3-compatible server on 127.0.0.1, on the port given (0: any free port).

Prints "moto listening on 127.0.0.1:PORT" with the port it really bound, so a test
never probes for a free port (another process could take it in between), then serves
until killed.
"""

import sys
import threading

from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"moto listening on {host}:{port}", flush=True)
threading.Event().wait()
