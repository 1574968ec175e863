"""Bad input to the NBD server (REFERENCE.md §5), over raw sockets: every handshake and
transmission case gets the specified error or a clean disconnect -- never a crash, a hang or
unbounded allocation -- and the server keeps serving others.

usage: python3 nbd_bad_input.py UNIX_SOCKET EXPORT_NAME SIZE
"""
import socket, struct, sys, time

SOCK, NAME, SIZE = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
checks = 0


def ok():
    global checks
    checks += 1


def connect(flags=3):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(15)
    s.connect(SOCK)
    hello = recvn(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
    assert struct.unpack(">H", hello[16:])[0] == 3
    s.sendall(struct.pack(">I", flags))
    return s


def recvn(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def closed(s):
    """True if the server closes the connection (reads EOF) within the timeout."""
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def reply(s):
    magic, opt, typ, length = struct.unpack(">QIII", recvn(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, typ, recvn(s, length)


def expect_reply(s, opt, typ):
    got = reply(s)
    assert got[0] == opt and got[1] == typ, "option %d: expected reply 0x%x, got 0x%x (%r)" % (opt, typ, got[1], got[2])
    ok()
    return got


ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = 0x80000001, 0x80000003, 0x80000006, 0x80000009
ACK, SERVER, INFO, META = 1, 2, 3, 4


def go(s, name=NAME, structured=True):
    if structured:
        option(s, 8)
        expect_reply(s, 8, ACK)
    option(s, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _, typ, _ = reply(s)
        if typ == ACK:
            return
        assert typ == INFO, hex(typ)


# ---------------- handshake ----------------
# unknown client flags -> close
s = connect(flags=0xFF); assert closed(s); ok()
# bad option magic -> close
s = connect(); s.sendall(struct.pack(">QII", 0x1234, 7, 0)); assert closed(s); ok()
# unknown option -> ERR_UNSUP, negotiation goes on
s = connect(); option(s, 99, b"x" * 10); expect_reply(s, 99, ERR_UNSUP)
option(s, 11); expect_reply(s, 11, ERR_UNSUP)  # EXTENDED_HEADERS not offered
# data on LIST / STRUCTURED_REPLY / STARTTLS -> ERR_INVALID
option(s, 3, b"junk"); expect_reply(s, 3, ERR_INVALID)
option(s, 8, b"junk"); expect_reply(s, 8, ERR_INVALID)
option(s, 5, b"junk"); expect_reply(s, 5, ERR_INVALID)
option(s, 5); expect_reply(s, 5, ERR_UNSUP)
# LIST lists the export
# NBD_REP_SERVER: u32 name length, the name, then its description
option(s, 3); _, typ, data = reply(s)
n = struct.unpack(">I", data[:4])[0]
assert typ == SERVER and data[4:4 + n] == NAME and n == len(NAME), data; ok()
while True:  # then the point exports (one per bookmark) and the ACK
    _, typ, data = reply(s)
    if typ == ACK: break
    assert typ == SERVER and data[4:4 + len(NAME) + 1] == NAME + b"@", data
ok()
# INFO/GO with namelen > optlen-6 (CVE-2022-26496) and 0xFFFFFFFF (CVE-2022-26495)
option(s, 6, struct.pack(">I", 100) + b"abc" + struct.pack(">H", 0)); expect_reply(s, 6, ERR_INVALID)
option(s, 7, struct.pack(">I", 0xFFFFFFFF) + b"abc" + struct.pack(">H", 0)); expect_reply(s, 7, ERR_INVALID)
# info count that does not match the data
option(s, 6, struct.pack(">I", 0) + struct.pack(">H", 5)); expect_reply(s, 6, ERR_INVALID)
# names of 257..4096 bytes (CVE-2017-15118): a valid name, but no such export
for n in (257, 4096):
    option(s, 6, struct.pack(">I", n) + b"a" * n + struct.pack(">H", 0)); expect_reply(s, 6, ERR_UNKNOWN)
# a 5000-byte name is over the 4096-byte limit
option(s, 6, struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">H", 0)); expect_reply(s, 6, ERR_INVALID)
# invalid UTF-8 name
option(s, 6, struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0)); expect_reply(s, 6, ERR_INVALID)
# meta context: SET before structured replies -> ERR_INVALID; query overrun; nqueries = 2^32-1
q = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
option(s, 10, q); expect_reply(s, 10, ERR_INVALID)
option(s, 9, struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 100) + b"base"); expect_reply(s, 9, ERR_INVALID)
option(s, 9, struct.pack(">I", 0) + struct.pack(">I", 0xFFFFFFFF)); expect_reply(s, 9, ERR_INVALID)
option(s, 9, q); expect_reply(s, 9, META); expect_reply(s, 9, ACK)
# an option over the 64 KiB limit is discarded (not buffered) and answered ERR_TOO_BIG
option(s, 6, b"\0" * 70000); expect_reply(s, 6, ERR_TOO_BIG)
# GO on an unknown export -> ERR_UNKNOWN, then GO on the right one works
option(s, 7, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)); expect_reply(s, 7, ERR_UNKNOWN)
go(s); ok()
s.close()
# option length 0xFFFFFFFF with nothing behind it: discarded as it arrives; the handshake
# deadline (10 s) closes the connection -- no 4 GiB allocation
s = connect(); option(s, 7, b""); s.sendall(struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF)[0:0])
s.sendall(struct.pack(">QII", IHAVEOPT, 6, 0xFFFFFFFF) + b"\0" * 1000)
reply(s)  # the first GO with empty data: ERR_INVALID
assert closed(s); ok()
# too many options -> close
s = connect()
try:
    for i in range(200):
        option(s, 99)
except (BrokenPipeError, ConnectionResetError):
    pass
n = 0
try:
    while True:
        reply(s); n += 1
except (EOFError, ConnectionResetError, socket.timeout):
    pass
assert 0 < n <= 128, n; ok()
# early hang-up in the middle of an option
s = connect(); s.sendall(struct.pack(">QII", IHAVEOPT, 7, 100) + b"abc"); s.close(); ok()
# NBD_OPT_EXPORT_NAME with an unknown name -> close; ABORT -> ACK then close
s = connect(); option(s, 1, b"nope"); assert closed(s); ok()
s = connect(); option(s, 2); expect_reply(s, 2, ACK); assert closed(s); ok()
# EXPORT_NAME with the right name: size and flags, no 124 zero bytes (NO_ZEROES)
s = connect(); option(s, 1, NAME); size, flags = struct.unpack(">QH", recvn(s, 10)); assert size == SIZE and flags & 1; ok(); s.close()

# ---------------- transmission ----------------
REQ = 0x25609513
EINVAL, ENOSPC, EPERM = 22, 28, 1


def request(s, typ, offset, length, flags=0, cookie=1, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, offset, length) + payload)


def simple(s):
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    assert magic == 0x67446698, hex(magic)
    return err, cookie


def structured(s):
    """Read structured chunks until DONE; return (chunks, error)."""
    chunks = []
    while True:
        magic = struct.unpack(">I", recvn(s, 4))[0]
        if magic == 0x67446698:
            err, cookie = struct.unpack(">IQ", recvn(s, 12))
            return chunks, err
        assert magic == 0x668e33ef, hex(magic)
        flags, typ, cookie, length = struct.unpack(">HHQI", recvn(s, 16))
        data = recvn(s, length)
        chunks.append((typ, data))
        if typ >= 32769:
            return chunks, struct.unpack(">I", data[:4])[0]
        if flags & 1:
            return chunks, 0


s = connect(); go(s, structured=False)
for typ in (9, 0xFFFF):
    request(s, typ, 0, 0); assert simple(s)[0] == EINVAL; ok()
request(s, 0, 0, 512, flags=1 << 2); assert simple(s)[0] == EINVAL; ok()          # DF without structured replies
request(s, 0, 0, 512, flags=1 << 3); assert simple(s)[0] == EINVAL; ok()          # REQ_ONE on READ
request(s, 1, 0, 512, flags=1 << 1, payload=b"x" * 512); assert simple(s)[0] == EINVAL; ok()  # NO_HOLE on WRITE
request(s, 0, 0, 512, flags=1 << 7); assert simple(s)[0] == EINVAL; ok()          # unknown flag
request(s, 3, 0, 512); assert simple(s)[0] == EINVAL; ok()                        # FLUSH with a length
request(s, 0, 2**64 - 1, 512); assert simple(s)[0] == EINVAL; ok()                # offset overflow
request(s, 0, SIZE - 100, 512); assert simple(s)[0] == EINVAL; ok()               # past the end
request(s, 1, SIZE - 100, 512, payload=b"y" * 512); assert simple(s)[0] == ENOSPC; ok()  # payload consumed
request(s, 6, 2**64 - 4096, 4096); assert simple(s)[0] == ENOSPC; ok()
request(s, 4, SIZE, 1); assert simple(s)[0] == ENOSPC; ok()
request(s, 7, 0, 4096); assert simple(s)[0] == EINVAL; ok()                       # BLOCK_STATUS, no context
request(s, 0, 0, 0); assert simple(s) == (0, 1); ok()                              # zero-length read
request(s, 1, 0, 0); assert simple(s) == (0, 1); ok()                              # zero-length write
request(s, 0, 0, 33 * 1024 * 1024); assert simple(s)[0] == EINVAL; ok()           # oversize read
# oversize WRITE: 33 MiB of payload, refused and discarded, connection still in step
request(s, 1, 0, 33 * 1024 * 1024, payload=b"z" * (33 * 1024 * 1024)); assert simple(s)[0] == EINVAL; ok()
# duplicate cookies are each answered
request(s, 1, 0, 4, cookie=7, payload=b"abcd"); request(s, 1, 4, 4, cookie=7, payload=b"efgh")
assert [simple(s), simple(s)] == [(0, 7), (0, 7)]; ok()
request(s, 0, 0, 4, cookie=8); request(s, 0, 0, 8, cookie=8)
lengths = set()
for _ in range(2):
    err, cookie = simple(s); assert (err, cookie) == (0, 8)
    # the two replies may come in either order; the 8-byte one carries both writes
    first = recvn(s, 4)
    if first == b"abcd":
        try:
            s.settimeout(0.5); rest = s.recv(4, socket.MSG_PEEK); s.settimeout(15)
        except socket.timeout:
            rest = b""; s.settimeout(15)
        if rest == b"efgh": recvn(s, 4); lengths.add(8)
        else: lengths.add(4)
assert lengths == {4, 8}, lengths; ok()
# 10^4 pipelined reads without reading replies, then read them all
for i in range(10000):
    request(s, 0, (i % 64) * 512, 512, cookie=1000 + i)
got = 0
for i in range(10000):
    err, cookie = simple(s); recvn(s, 512); got += 1
assert got == 10000; ok()
# bad magic -> hard disconnect
s.sendall(struct.pack(">IHHQQI", 0xdeadbeef, 0, 0, 1, 0, 512)); assert closed(s); ok()

# structured replies: reads come as OFFSET_DATA/OFFSET_HOLE chunks in range, errors as ERROR chunks
s = connect(); go(s)
request(s, 1, 8192, 4096, payload=b"q" * 4096, cookie=2); assert simple(s) == (0, 2); ok()
request(s, 0, 0, 65536, cookie=3)
chunks, err = structured(s)
assert err == 0 and chunks, chunks
covered = 0
for typ, data in chunks:
    off = struct.unpack(">Q", data[:8])[0]
    n = len(data) - 8 if typ == 1 else struct.unpack(">I", data[8:12])[0]
    assert typ in (1, 2) and 0 <= off and off + n <= 65536
    covered += n
assert covered == 65536; ok()
request(s, 0, 0, 65536, flags=1 << 2, cookie=4)                                  # DF: one data chunk
chunks, err = structured(s); assert err == 0 and len(chunks) == 1 and chunks[0][0] == 1; ok()
request(s, 0, SIZE, 512, cookie=5); chunks, err = structured(s); assert err == EINVAL; ok()
request(s, 0, 0, 0, cookie=6); chunks, err = structured(s); assert err == 0 and chunks[0][0] == 0; ok()  # NONE chunk
# truncated WRITE payload, then hang up: the server must not apply a partial write
request(s, 1, 0, 4096, payload=b"t" * 100, cookie=9); s.close(); ok()

# and the server still serves a well-behaved client
time.sleep(0.2)
s = connect(); go(s, structured=False)
request(s, 0, 8192, 4, cookie=11); err, cookie = simple(s); assert err == 0 and recvn(s, 4) == b"qqqq"; ok()
request(s, 0, 0, 4, cookie=12); err, cookie = simple(s); assert recvn(s, 4) != b"tttt"; ok()
request(s, 2, 0, 0); assert closed(s); ok()                                        # DISC
print("nbd_bad_input.py: %d checks passed" % checks)
