"""The tests' own PROXY protocol codec (proxyproto.py) against fixed bytes written from the
specification, before any test trusts it to judge sluice: the spec's v1 lines, v2 headers laid
out by hand, the CRC32c test vectors of RFC 3720, headers it must refuse, and read_header()
taking exactly the header off a socket. No daemon is started."""

import socket

import proxyproto
from harness import check


def raises(data, incomplete=False):
    """parse(data) must raise ValueError (Incomplete exactly when `incomplete`)."""
    try:
        proxyproto.parse(data)
    except proxyproto.Incomplete as e:
        check(incomplete, f"{data!r}: Incomplete ({e}), expected a refusal")
        return
    except ValueError as e:
        check(not incomplete, f"{data!r}: refused ({e}), expected Incomplete")
        return
    raise AssertionError(f"{data!r} parsed, expected ValueError")


SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_crc32c_vectors(t):
    # RFC 3720 appendix B.4 and the common "123456789" check value.
    check(proxyproto.crc32c(b"123456789") == 0xE3069283, "check value")
    check(proxyproto.crc32c(bytes(32)) == 0x8A9136AA, "32 zero bytes")
    check(proxyproto.crc32c(b"\xff" * 32) == 0x62A8AB43, "32 0xff bytes")
    check(proxyproto.crc32c(bytes(range(32))) == 0x46DD794E, "32 incrementing bytes")


def test_v1_spec_lines(t):
    header, rest = proxyproto.parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n")
    check(header["version"] == 1 and header["length"] == 47, f"{header}")
    check(header["src"] == ("192.168.0.1", 56324) and header["dst"] == ("192.168.0.11", 443), f"{header}")
    check(rest == b"GET / HTTP/1.1\r\n", f"rest {rest!r}")

    f = "ffff:" * 7 + "ffff"
    line6 = f"PROXY TCP6 {f} {f} 65535 65535\r\n".encode()
    check(len(line6) == 104, "the spec's longest TCP6 line is 104 bytes")
    header, _ = proxyproto.parse(line6)
    check(header["src"] == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), f"{header}")

    header, rest = proxyproto.parse(b"PROXY UNKNOWN\r\n\x16\x03")
    check(header["family"] == "UNKNOWN" and header["src"] is None and rest == b"\x16\x03", f"{header}")
    worst = f"PROXY UNKNOWN {f} {f} 65535 65535\r\n".encode()
    check(len(worst) == 107, "the spec's worst case is 107 bytes")
    check(proxyproto.parse(worst)[0]["length"] == 107, "worst case")
    raises(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")


def test_v1_refusals(t):
    for bad in (
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x00\xa5",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
    ):
        raises(bad)
    raises(b"PROXY TCP4 1.2.3.4", incomplete=True)
    raises(b"PROX", incomplete=True)
    raises(b"", incomplete=True)


def test_v2_spec_layouts(t):
    # TCP over IPv4: 0x21 PROXY, 0x11 AF_INET+STREAM, length 12, addresses, ports 56324 and 443.
    tcp4 = SIG + bytes.fromhex("21 11 000c c0a80001 c0a8000b dc04 01bb")
    header, rest = proxyproto.parse(tcp4 + b"\x16")
    check(header["version"] == 2 and header["length"] == 28 and rest == b"\x16", f"{header}")
    check(header["command"] == "PROXY" and header["family"] == "AF_INET" and header["transport"] == "STREAM", f"{header}")
    check(header["src"] == ("192.168.0.1", 56324) and header["dst"] == ("192.168.0.11", 443), f"{header}")
    check(proxyproto.v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == tcp4, "builder: TCP4 layout")

    tcp6 = SIG + bytes.fromhex("21 21 0024" + "00" * 15 + "01" + "20010db8" + "00" * 11 + "02" + "3039 0050")
    header, _ = proxyproto.parse(tcp6)
    check(header["src"] == ("::1", 12345) and header["dst"] == ("2001:db8::2", 80), f"{header}")
    check(proxyproto.v2(("::1", 12345), ("2001:db8::2", 80)) == tcp6, "builder: TCP6 layout")

    local = SIG + bytes.fromhex("20 00 0000")
    header, _ = proxyproto.parse(local)
    check(header["command"] == "LOCAL" and header["family"] == "AF_UNSPEC" and header["length"] == 16, f"{header}")
    check(proxyproto.v2(None, None, command="LOCAL") == local, "builder: LOCAL layout")

    unix = SIG + bytes.fromhex("21 31 00d8") + b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")
    header, _ = proxyproto.parse(unix)
    check(header["family"] == "AF_UNIX" and header["src"] == b"/a" and header["dst"] == b"/b", f"{header}")


def test_v2_tlvs_decoded(t):
    # Every TLV sluice sends, laid out by hand after an AF_INET block, then a CRC32C whose value
    # came from the RFC 3720 algorithm (the same header is in sluice's unit tests).
    tlvs = (
        bytes.fromhex("01 0002") + b"h2"
        + bytes.fromhex("02 000f") + b"www.example.com"
        + bytes.fromhex("20 0029 07 00000000")
        + bytes.fromhex("21 0007") + b"TLSv1.3"
        + bytes.fromhex("22 0002") + b"cn"
        + bytes.fromhex("23 0006") + b"cipher"
        + bytes.fromhex("24 0003") + b"sig"
        + bytes.fromhex("25 0003") + b"key"
        + bytes.fromhex("e0 0003") + b"\x30\x01\x00"
        + bytes.fromhex("04 0001 00")
        + bytes.fromhex("05 0002 abcd")
    )
    block = bytes.fromhex("c0000201 c0000202 0001 0002")
    data = SIG + bytes([0x21, 0x11]) + (len(block) + len(tlvs)).to_bytes(2, "big") + block + tlvs
    header, rest = proxyproto.parse(data)
    check(rest == b"", f"rest {rest!r}")
    check(header["alpn"] == b"h2" and header["authority"] == "www.example.com", f"{header}")
    check(header["client_cert_der"] == b"\x30\x01\x00" and header["unique_id"] == b"\xab\xcd", f"{header}")
    ssl = header["ssl"]
    check(ssl["client_ssl"] and ssl["cert_conn"] and ssl["cert_sess"] and ssl["verify"] == 0, f"{ssl}")
    check((ssl["version"], ssl["cn"], ssl["cipher"], ssl["sig_alg"], ssl["key_alg"]) == ("TLSv1.3", "cn", "cipher", "sig", "key"), f"{ssl}")
    check([k for k, _ in header["tlvs"]] == [0x01, 0x02, 0x20, 0xE0, 0x04, 0x05], f"{header['tlvs']}")

    built = proxyproto.v2(
        ("192.0.2.1", 1),
        ("192.0.2.2", 2),
        tlvs=[
            (proxyproto.PP2_TYPE_ALPN, b"h2"),
            (proxyproto.PP2_TYPE_AUTHORITY, "www.example.com"),
            proxyproto.ssl_tlv(client=7, version="TLSv1.3", cn="cn", cipher="cipher", sig_alg="sig", key_alg="key"),
            (proxyproto.PP2_TYPE_CLIENT_CERT, b"\x30\x01\x00"),
            (proxyproto.PP2_TYPE_NOOP, b"\0"),
            (proxyproto.PP2_TYPE_UNIQUE_ID, b"\xab\xcd"),
        ],
    )
    check(built == data, "the builder lays the TLVs out as the spec does")

    crc = SIG + bytes.fromhex("20 00 0007 03 0004 a9b87e8f")
    check(proxyproto.parse(crc)[0]["crc32c"] == 0xA9B87E8F, "CRC32C accepted")
    check(proxyproto.v2(None, None, command="LOCAL", with_crc32c=True) == crc, "builder: CRC32C")
    raises(crc[:-1] + b"\x8e")
    with_crc = proxyproto.v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(1, b"h2")], with_crc32c=True)
    check(proxyproto.parse(with_crc)[0]["alpn"] == b"h2", "a CRC32C after other TLVs")
    raises(with_crc.replace(b"h2", b"h3"))


def test_v2_refusals(t):
    good = proxyproto.v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    block = good[16:28]
    for bad in (
        SIG[:5] + b"\x01" + SIG[6:] + good[12:],  # signature
        good[:12] + b"\x11" + good[13:],  # version 1
        good[:12] + b"\x22" + good[13:],  # command 2
        good[:13] + b"\x13" + good[14:],  # transport 3
        good[:13] + b"\x41" + good[14:],  # family 4
        good[:13] + b"\x01" + good[14:],  # UNSPEC family with STREAM
        good[:14] + b"\x00\x0b" + good[16:27],  # length shorter than the address block
        good[:14] + b"\x00\x10" + block + bytes.fromhex("02 0002 61"),  # a TLV past the end
        SIG + bytes.fromhex("21 00 0002 04 00"),  # a TLV header cut short
        proxyproto.v2(None, None, tlvs=[(0x20, b"\x01\0\0\0")]),  # SSL without its verify
        proxyproto.v2(None, None, tlvs=[proxyproto.ssl_tlv(extra=b"\x21\x00\x05ab")]),
        proxyproto.v2(None, None, tlvs=[(3, b"\0\0\0")]),  # a 3-byte CRC32C
    ):
        raises(bad)
    for cut in (1, 12, 13, 15, 16, 27):
        raises(good[:cut], incomplete=True)


def test_v1_builder(t):
    check(proxyproto.v1(("192.0.2.1", 5), ("192.0.2.2", 443)) == b"PROXY TCP4 192.0.2.1 192.0.2.2 5 443\r\n", "TCP4")
    check(proxyproto.v1(("2001:db8::1", 5), ("::1", 443)) == b"PROXY TCP6 2001:db8::1 ::1 5 443\r\n", "TCP6")
    check(proxyproto.v1(None, ("::1", 443)) == b"PROXY UNKNOWN\r\n", "UNKNOWN without a source")
    check(proxyproto.v1(("192.0.2.1", 5), ("::1", 443)) == b"PROXY UNKNOWN\r\n", "UNKNOWN for mixed families")


def test_read_header_takes_exactly_the_header(t):
    for header in (
        proxyproto.v1(("192.0.2.1", 5), ("192.0.2.2", 443)),
        proxyproto.v1(None, None),
        proxyproto.v2(("2001:db8::1", 5), ("2001:db8::2", 443), tlvs=[(1, b"h2")], with_crc32c=True),
        proxyproto.v2(None, None, command="LOCAL"),
    ):
        a, b = socket.socketpair()
        t.defer(a.close)
        t.defer(b.close)
        a.settimeout(5)
        b.settimeout(5)
        a.sendall(header + b"\x16\x03\x01after")
        got = proxyproto.read_header(b)
        check(got["length"] == len(header), f"read {got['length']} bytes of a {len(header)}-byte header")
        check(b.recv(100) == b"\x16\x03\x01after", "bytes after the header were consumed")

    a, b = socket.socketpair()
    t.defer(a.close)
    t.defer(b.close)
    b.settimeout(5)
    a.sendall(b"\x16\x03\x01\x00\x05hello")
    try:
        proxyproto.read_header(b)
    except ValueError:
        pass
    else:
        raise AssertionError("read_header accepted a TLS record")
    a2, b2 = socket.socketpair()
    t.defer(b2.close)
    b2.settimeout(5)
    a2.sendall(b"PROXY TCP4 1.2.3.4")
    a2.close()
    try:
        proxyproto.read_header(b2)
    except ConnectionError:
        pass
    else:
        raise AssertionError("read_header returned on EOF inside a header")
