"""agent/http: the L7 data path (planned; issue "L7 in the node proxy").

It will hold the HTTP/1.1 and HTTP/2 codecs (h2, httptools or h11: libraries, never a
hand-written parser), the per-request pipeline and the upstream pools. It sits above
``agent.proxy`` in the layering: requests ride the proxy's HBONE streams and listeners, and the
decisions for a request (route, backend, endpoint, authorize) are ``agent.decide``'s pure
functions. Nothing lower may import it; ``agent.app`` wires it into the listeners.
"""
