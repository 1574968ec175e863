#!/usr/bin/env python3
"""A small NBD server (fixed newstyle, simple replies) over a file, for tap's tests of a
misbehaving upstream. It serves correctly, except that on its first connection with writes it
breaks the protocol once, after N writes, as MODE says:

  garbage  the reply to the next write is 16 random bytes (the write was done)
  cookie   the reply to the next write carries another cookie (the write was done)
  short    the reply to the next read holds half its data, then the connection closes
  oversize the reply to the next read is a structured chunk of 64 MiB (never negotiated)

usage: fake_nbd_upstream.py SOCKET IMAGE MODE N
"""
import os, socket, struct, sys, threading

SOCK, IMAGE, MODE, AFTER = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
state = {"faulted": False}
lock = threading.Lock()

def recv_exact(c, n):
    b = b""
    while len(b) < n:
        part = c.recv(n - len(b))
        if not part: raise EOFError
        b += part
    return b

def option_reply(c, opt, kind, data=b""):
    c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, kind, len(data)) + data)

def serve(c):
    fd = os.open(IMAGE, os.O_RDWR)
    size = os.fstat(fd).st_size
    c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 1 | 2))
    recv_exact(c, 4)
    while True:
        magic, opt, n = struct.unpack(">QII", recv_exact(c, 16))
        recv_exact(c, n)
        if opt in (6, 7):  # INFO, GO: the export, then ACK
            option_reply(c, opt, 3, struct.pack(">HQH", 0, size, 1 | 4 | 8))
            option_reply(c, opt, 1)
            if opt == 7: break
        elif opt == 2:
            option_reply(c, opt, 1); return
        else:
            option_reply(c, opt, 2**31 + 1)  # ERR_UNSUP
    writes = 0
    while True:
        magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv_exact(c, 28))
        with lock:
            fault = not state["faulted"] and writes >= AFTER
        if kind == 1:  # WRITE
            data = recv_exact(c, length)
            os.pwrite(fd, data, offset)
            writes += 1
            if fault and MODE in ("garbage", "cookie"):
                with lock: state["faulted"] = True
                c.sendall(os.urandom(16) if MODE == "garbage" else struct.pack(">IIQ", 0x67446698, 0, cookie + 1))
                continue
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))
        elif kind == 0:  # READ
            data = os.pread(fd, length, offset)
            if fault and MODE == "short":
                with lock: state["faulted"] = True
                c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + data[:length // 2])
                c.close(); return
            if fault and MODE == "oversize":
                with lock: state["faulted"] = True
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, cookie, 64 << 20) + data)
                continue
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + data)
        elif kind == 2:  # DISC
            return
        elif kind == 3:  # FLUSH
            os.fdatasync(fd)
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))
        else:
            c.sendall(struct.pack(">IIQ", 0x67446698, 22, cookie))  # EINVAL

def handle(c):
    try: serve(c)
    except (EOFError, OSError): pass
    finally:
        try: c.close()
        except OSError: pass

s = socket.socket(socket.AF_UNIX)
if os.path.exists(SOCK): os.unlink(SOCK)
s.bind(SOCK); s.listen(8)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
