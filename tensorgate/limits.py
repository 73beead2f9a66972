"""Size limits shared by the server, the client and the remote backend.

One home, so that a gateway, the clients that call it and a front tier that forwards to it
agree on what fits in one message.
"""

#: gRPC message size, both directions: large enough for a batch of images. The server
#: refuses bigger requests with RESOURCE_EXHAUSTED (``serve --max-message-bytes``).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Shapes whose element count exceeds this are refused before anything is allocated
#: (``serve --max-tensor-elements`` lowers it).
MAX_ELEMENTS = 1 << 31
