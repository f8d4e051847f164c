"""A REAPI client on gRPC's C core (PyPI grpcio), the stack of Reclient and other C++ clients:
GetCapabilities, then a FindMissingBlobs of one digest, over TLS (and mTLS when given a client
certificate). Messages are encoded by hand: no generated code.

    grpcio_reapi.py HOST:PORT CA_FILE [CERT_FILE KEY_FILE]

Prints `ok capabilities=N missing=M` and exits 0, or prints the gRPC status and exits 1.
"""
import hashlib
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, wire_type, payload):
    key = varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def main():
    addr, ca = sys.argv[1], sys.argv[2]
    key = cert = None
    if len(sys.argv) > 4:
        cert = open(sys.argv[3], "rb").read()
        key = open(sys.argv[4], "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=key,
        certificate_chain=cert,
    )
    # The server certificate is for "localhost"; the address may be an IP.
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(addr, credentials, options=options) as channel:
        try:
            caps = channel.unary_unary(
                "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
            )(b"", timeout=10)
            blob = b"asked by grpcio"
            digest = field(1, 2, hashlib.sha256(blob).hexdigest().encode()) + field(
                2, 0, varint(len(blob))
            )
            missing = channel.unary_unary(
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
            )(field(2, 2, digest), timeout=10)
        except grpc.RpcError as e:
            print(f"refused {e.code().name}: {e.details()}")
            return 1
    print(f"ok capabilities={len(caps)} missing={len(missing)}")
    return 0 if caps and missing else 1


if __name__ == "__main__":
    sys.exit(main())
