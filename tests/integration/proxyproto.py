"""The PROXY protocol (HAProxy, versions 1 and 2) for tests that play a load balancer in front of
sluice or a backend behind it. Written from the specification, standard library only, and kept
apart from sluice's C++ so that each can check the other.

    parse(data) -> (header, rest)     raises Incomplete (a ValueError) or ValueError
    read_header(sock) -> header       reads exactly the header's bytes from a socket
    v1(src, dst) -> bytes             "PROXY TCP4 ..."; src/dst are (host, port) or None
    v2(src, dst, tlvs=[...]) -> bytes a binary header; tlvs are (type, bytes) pairs
    ssl_tlv(...) -> (0x20, bytes)     a PP2_TYPE_SSL TLV for v2()
    crc32c(data) -> int               the CRC32c that PP2_TYPE_CRC32C carries

A parsed header is a dict:

    version      1 or 2
    length       bytes the header took
    command      "PROXY" or "LOCAL" (v1: "PROXY", or "LOCAL" for UNKNOWN)
    family       v1: "TCP4", "TCP6", "UNKNOWN"; v2: "AF_UNSPEC", "AF_INET", "AF_INET6", "AF_UNIX"
    transport    v2: "UNSPEC", "STREAM", "DGRAM"; v1: "STREAM" (or "UNSPEC" for UNKNOWN)
    src, dst     (host, port) for IP families, the path bytes for AF_UNIX, else None
    tlvs         [(type, value bytes)] in order, NOOP included
    alpn         bytes or None
    authority    str or None
    crc32c       the checksum (already verified) or None
    unique_id    bytes or None
    netns        str or None
    ssl          None or {client, client_ssl, cert_conn, cert_sess, verify, version, cn, cipher,
                 sig_alg, key_alg, tlvs} (absent sub-TLVs are None)
    client_cert_der  bytes of TLV 0xE0 (sluice's client certificate) or None

Where the specification leaves room, this reads it as sluice does: after an AF_UNSPEC fixed part
every byte is a TLV (no address block); UNSPEC goes only with UNSPEC, and the four families only
with STREAM or DGRAM. Everything else that does not fit the specification raises ValueError.
"""

import ipaddress
import re
import socket
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
PP2_TYPE_CLIENT_CERT = 0xE0  # PP2_TYPE_MIN_CUSTOM: sluice puts the client certificate here

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_FAMILIES = {0x0: "AF_UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}
_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_ADDRESS_BYTES = {"AF_UNSPEC": 0, "AF_INET": 12, "AF_INET6": 36, "AF_UNIX": 216}
_SSL_NAMES = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "cn",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
}


class Incomplete(ValueError):
    """The bytes are a valid start of a header that has not fully arrived."""


# -- CRC32c (Castagnoli), bit by bit as RFC 4960 appendix B describes it -----------------------


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# -- parsing ---------------------------------------------------------------------------------


def parse(data):
    """(header dict, the bytes after the header). Raises Incomplete when `data` is a valid but
    unfinished header, ValueError when it cannot be one."""
    data = bytes(data)
    if not data:
        raise Incomplete("no bytes yet")
    if data[:1] == SIGNATURE[:1]:
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    raise ValueError(f"not a PROXY header: starts with {data[:8]!r}")


_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


def _port(text):
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ValueError(f"bad v1 port {text!r}")
    return int(text)


def _v1_address(text, version):
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"bad v1 address {text!r}") from None
    if address.version != version or b"%" in text:
        raise ValueError(f"v1 address {text!r} is not IPv{version}")
    return str(address)


def _parse_v1(data):
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if not b"PROXY ".startswith(data[:6]):
            raise ValueError(f"bad v1 signature {data[:6]!r}")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ValueError("a lone CR or LF in the v1 line")
        if len(data) >= V1_MAX:
            raise ValueError("no CRLF within 107 bytes")
        raise Incomplete("v1 line without its CRLF yet")
    line, rest = data[:end], data[end + 2 :]
    if b"\r" in line or b"\n" in line:
        raise ValueError("a lone CR or LF in the v1 line")
    header = {"version": 1, "length": end + 2, "tlvs": [], "ssl": None}
    for key in ("alpn", "authority", "crc32c", "unique_id", "netns", "client_cert_der"):
        header[key] = None
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        header.update(command="LOCAL", family="UNKNOWN", transport="UNSPEC", src=None, dst=None)
        return header, rest
    parts = line.split(b" ")
    if len(parts) != 6 or parts[0] != b"PROXY" or parts[1] not in (b"TCP4", b"TCP6"):
        raise ValueError(f"bad v1 line {line!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    src = (_v1_address(parts[2], version), _port(parts[4]))
    dst = (_v1_address(parts[3], version), _port(parts[5]))
    header.update(command="PROXY", family=parts[1].decode(), transport="STREAM", src=src, dst=dst)
    return header, rest


def _tlvs(block, what):
    """[(type, value)] of a TLV block; ValueError if a TLV does not fit."""
    found = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < 3:
            raise ValueError(f"{what}: {len(block) - offset} stray bytes, not a TLV")
        kind, size = block[offset], int.from_bytes(block[offset + 1 : offset + 3], "big")
        value = block[offset + 3 : offset + 3 + size]
        if len(value) != size:
            raise ValueError(f"{what}: TLV 0x{kind:02x} claims {size} bytes, {len(value)} left")
        found.append((kind, value))
        offset += 3 + size
    return found


def _ssl(value):
    if len(value) < 5:
        raise ValueError(f"PP2_TYPE_SSL of {len(value)} bytes, at least 5 needed")
    client = value[0]
    ssl = {
        "client": client,
        "client_ssl": bool(client & PP2_CLIENT_SSL),
        "cert_conn": bool(client & PP2_CLIENT_CERT_CONN),
        "cert_sess": bool(client & PP2_CLIENT_CERT_SESS),
        "verify": struct.unpack(">I", value[1:5])[0],
        "tlvs": _tlvs(value[5:], "PP2_TYPE_SSL"),
    }
    for name in _SSL_NAMES.values():
        ssl[name] = None
    for kind, sub in ssl["tlvs"]:
        if kind in _SSL_NAMES:
            ssl[_SSL_NAMES[kind]] = sub.decode("utf-8", "surrogateescape")
    return ssl


def _ip_endpoints(block, size):
    if size == 4:
        src, dst = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
    else:
        src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
    sport, dport = struct.unpack(">HH", block[2 * size : 2 * size + 4])
    return (str(src), sport), (str(dst), dport)


def _parse_v2(data):
    if not SIGNATURE.startswith(data[:12]):
        raise ValueError("bad v2 signature")
    if len(data) >= 13:
        if data[12] >> 4 != 2:
            raise ValueError(f"v2 version {data[12] >> 4}")
        if data[12] & 0xF not in (0, 1):
            raise ValueError(f"v2 command {data[12] & 0xF}")
    if len(data) >= 14 and (data[13] >> 4 not in _FAMILIES or data[13] & 0xF not in _TRANSPORTS):
        raise ValueError(f"v2 family/transport 0x{data[13]:02x}")
    if len(data) < 16:
        raise Incomplete("v2 fixed part not complete")
    size = struct.unpack(">H", data[14:16])[0]
    family, transport = _FAMILIES[data[13] >> 4], _TRANSPORTS[data[13] & 0xF]
    # The spec lists UNSPEC with UNSPEC, and the four real families with STREAM or DGRAM.
    if (family == "AF_UNSPEC") != (transport == "UNSPEC"):
        raise ValueError(f"v2 family/transport 0x{data[13]:02x}")
    address_bytes = _ADDRESS_BYTES[family]
    if size < address_bytes:
        raise ValueError(f"v2 length {size} shorter than the {family} address block")
    if len(data) < 16 + size:
        raise Incomplete(f"v2 header of {16 + size} bytes, {len(data)} so far")
    raw, rest = data[: 16 + size], data[16 + size :]
    block = raw[16 : 16 + address_bytes]
    header = {
        "version": 2,
        "length": 16 + size,
        "command": "PROXY" if data[12] & 0xF == 1 else "LOCAL",
        "family": family,
        "transport": transport,
        "src": None,
        "dst": None,
        "tlvs": _tlvs(raw[16 + address_bytes :], "v2 TLVs"),
        "alpn": None,
        "authority": None,
        "crc32c": None,
        "unique_id": None,
        "netns": None,
        "ssl": None,
        "client_cert_der": None,
    }
    if family in ("AF_INET", "AF_INET6"):
        header["src"], header["dst"] = _ip_endpoints(block, 4 if family == "AF_INET" else 16)
    elif family == "AF_UNIX":
        header["src"], header["dst"] = block[:108].rstrip(b"\0"), block[108:].rstrip(b"\0")

    offset = 16 + address_bytes
    for kind, value in header["tlvs"]:
        if kind == PP2_TYPE_ALPN:
            header["alpn"] = value
        elif kind == PP2_TYPE_AUTHORITY:
            header["authority"] = value.decode("utf-8", "surrogateescape")
        elif kind == PP2_TYPE_CRC32C:
            if len(value) != 4:
                raise ValueError(f"PP2_TYPE_CRC32C of {len(value)} bytes")
            zeroed = raw[: offset + 3] + b"\0\0\0\0" + raw[offset + 7 :]
            expected = struct.unpack(">I", value)[0]
            if crc32c(zeroed) != expected:
                raise ValueError(f"CRC32c mismatch: header says {expected:08x}, bytes give {crc32c(zeroed):08x}")
            header["crc32c"] = expected
        elif kind == PP2_TYPE_UNIQUE_ID:
            header["unique_id"] = value
        elif kind == PP2_TYPE_NETNS:
            header["netns"] = value.decode("ascii", "surrogateescape")
        elif kind == PP2_TYPE_SSL:
            header["ssl"] = _ssl(value)
        elif kind == PP2_TYPE_CLIENT_CERT:
            header["client_cert_der"] = value
        offset += 3 + len(value)
    return header, rest


def read_header(sock):
    """Reads exactly one PROXY header from a blocking socket (with a timeout) and returns its
    dict; the connection's next byte is the first after the header. ValueError if the bytes are
    not a header, ConnectionError if the peer closes first."""

    def take(n):
        got = b""
        while len(got) < n:
            chunk = sock.recv(n - len(got))
            if not chunk:
                raise ConnectionError(f"EOF after {len(got)} of {n} header bytes")
            got += chunk
        return got

    data = take(1)
    if data == SIGNATURE[:1]:
        data += take(15)
        try:
            parse(data)
        except Incomplete:
            pass
        data += take(struct.unpack(">H", data[14:16])[0])
    else:
        # v1: one byte at a time, so nothing after the CRLF is consumed.
        while not data.endswith(b"\r\n"):
            try:
                parse(data)
            except Incomplete:
                pass
            data += take(1)
    header, rest = parse(data)
    assert rest == b""
    return header


# -- building --------------------------------------------------------------------------------


def _ip(endpoint):
    return ipaddress.ip_address(endpoint[0]) if endpoint is not None else None


def v1(src, dst):
    """A v1 line. src and dst are (host, port); None (or mixed families) gives UNKNOWN."""
    a, b = _ip(src), _ip(dst)
    if a is None or b is None or a.version != b.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if a.version == 4 else "TCP6"
    return f"PROXY {family} {a} {b} {src[1]} {dst[1]}\r\n".encode("ascii")


def tlv(kind, value):
    value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return bytes([kind]) + struct.pack(">H", len(value)) + value


def ssl_tlv(client=PP2_CLIENT_SSL, verify=0, version=None, cn=None, cipher=None, sig_alg=None,
            key_alg=None, extra=b""):
    """(PP2_TYPE_SSL, value) with the sub-TLVs given (None: left out); `extra` is appended
    as is (for malformed ones)."""
    value = bytes([client]) + struct.pack(">I", verify)
    for kind, text in ((PP2_SUBTYPE_SSL_VERSION, version), (PP2_SUBTYPE_SSL_CN, cn),
                       (PP2_SUBTYPE_SSL_CIPHER, cipher), (PP2_SUBTYPE_SSL_SIG_ALG, sig_alg),
                       (PP2_SUBTYPE_SSL_KEY_ALG, key_alg)):
        if text is not None:
            value += tlv(kind, text)
    return (PP2_TYPE_SSL, value + extra)


def v2(src, dst, tlvs=(), command="PROXY", with_crc32c=False, family_byte=None, address_block=None):
    """A v2 header. src and dst are (host, port) of one IP version, or None for AF_UNSPEC.
    tlvs are (type, bytes or str) pairs written in order; with_crc32c appends a PP2_TYPE_CRC32C
    and fills it in. family_byte and address_block override what src/dst would give (for
    headers a test wants odd)."""
    a, b = _ip(src), _ip(dst)
    if a is None or b is None:
        natural, block = 0x00, b""
    elif a.version != b.version:
        raise ValueError("v2(): src and dst of different IP versions")
    else:
        natural = 0x11 if a.version == 4 else 0x21
        block = a.packed + b.packed + struct.pack(">HH", src[1], dst[1])
    family_byte = natural if family_byte is None else family_byte
    block = block if address_block is None else address_block
    body = block + b"".join(tlv(k, v) for k, v in tlvs)
    if with_crc32c:
        body += tlv(PP2_TYPE_CRC32C, b"\0\0\0\0")
    if len(body) > 0xFFFF:
        raise ValueError(f"v2(): {len(body)} bytes after the fixed part, at most 65535")
    header = SIGNATURE + bytes([0x20 | (1 if command == "PROXY" else 0), family_byte])
    header += struct.pack(">H", len(body)) + body
    if with_crc32c:
        header = header[:-4] + struct.pack(">I", crc32c(header))
    return header
