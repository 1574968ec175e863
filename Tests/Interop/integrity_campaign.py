#!/usr/bin/python3
"""The bit-flip campaign of integrity-campaign.sh (run with /usr/bin/python3: libnbd's `nbd`
module lives only there).

  integrity_campaign.py workload URI SEED DIR
      Writes a workload determined by SEED through libnbd, one request at a time, keeping a
      model of the volume; saves the model as of each checkpoint seq in DIR/expected/ and the
      points in DIR/points.json (seq checkpoints, the bookmark to add, the request count).

  integrity_campaign.py campaign DIR
      DIR holds mirror/ (written by `rewind serve`, server stopped), expected/ and points.json.
      Checks the pristine mirror, then runs ITERATIONS iterations: a copy of the mirror gets ONE
      damage (a bit flipped in, or a truncation of, journal/data.mdb or a payload log file),
      then `verify` runs on it. When verify exits 0, every checkpoint is restored from the
      mirror it passed, and each must be exact. Otherwise `restore` of one checkpoint (of every
      checkpoint every 10th iteration) runs on a copy of the mirror as damaged. Each command
      must either exit 0 (restore: with exactly the expected image) or exit 1 with a
      `rewind: error: ` line; a signal, a hang (TIMEOUT s), another exit, a wrong image or a
      write far past the volume's end (EFBIG) fails.
      Environment: REWIND (binary), SEED, ITERATIONS, ONLY (run only this iteration), TIMEOUT,
      KEEP_DIR (where a failing run keeps the pristine mirror for REUSE=...).
      Prints a table by damage kind and outcome, the distinct messages users were shown, and a
      last line `CHECKS n FAILS m`.
"""
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

KINDS = [("mdb-flip", 60), ("mdb-trunc", 10), ("log-flip", 20), ("log-trunc", 10)]


def log_uniform(rng, lo, hi):
    import math
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ---------------------------------------------------------------- workload

def workload(uri, seed, outdir):
    import nbd
    rng = random.Random("workload:%d" % seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    model = bytearray(size)
    count = rng.randint(150, 300)
    # 5 checkpoints spread over 1..count, the last one the newest record; a bookmark on its own seq
    marks = sorted({rng.randint(1 + i * count // 5, max(1 + i * count // 5, (i + 1) * count // 5 - 1))
                    for i in range(4)} | {count})
    bookmark = rng.randint(1, count)
    os.makedirs(os.path.join(outdir, "expected"), exist_ok=True)

    def save(k):
        with open(os.path.join(outdir, "expected", "seq-%d.img" % k), "wb") as f:
            f.write(model)

    kinds = collections.Counter()
    for k in range(1, count + 1):
        op = rng.randrange(100)
        if op < 62:  # write, 512 B to 256 KiB, aligned or not, some FUA
            n = log_uniform(rng, 512, 256 << 10)
            if rng.random() < 0.5:
                n = max(512, n // 512 * 512)
                off = rng.randrange(0, size - n + 1, 4096) if n <= size - 4096 else 0
            else:
                off = rng.randrange(0, size - n + 1)
            data = rng.randbytes(n)
            fua = rng.random() < 0.1
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            model[off:off + n] = data
            kinds["write"] += 1
        elif op < 94:  # write-zeroes (some NO_HOLE) or trim, 512 B to 512 KiB
            n = log_uniform(rng, 512, 512 << 10)
            off = rng.randrange(0, size - n + 1, 512 if rng.random() < 0.5 else 1)
            if op < 78:
                h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.3 else 0)
                kinds["zero"] += 1
            else:
                h.trim(n, off)
                kinds["trim"] += 1
            model[off:off + n] = bytes(n)
        else:
            h.flush()
            kinds["flush"] += 1
        if k in marks or k == bookmark:
            save(k)
    assert h.pread(size, 0) == bytes(model), "the volume read back differs from the model"
    h.shutdown()
    with open(os.path.join(outdir, "points.json"), "w") as f:
        json.dump({"count": count, "seqs": marks, "bookmark": ["mid", bookmark], "size": size}, f)
    print("workload: %d requests (%s); checkpoints %s, bookmark mid = seq:%d"
          % (count, ", ".join("%d %s" % (v, k) for k, v in sorted(kinds.items())),
             " ".join("seq:%d" % s for s in marks), bookmark))


# ---------------------------------------------------------------- campaign

def read(path):
    with open(path, "rb") as f:
        return f.read()


def copy_mirror(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    subprocess.run(["cp", "-a", "--sparse=always", src, dst], check=True)


PROGRESS = re.compile(r"^(restore|verify): ")


def difference(got, want, unit=4096):
    if len(got) != len(want):
        return "%d bytes, expected %d" % (len(got), len(want))
    blocks = [b for b in range(0, len(want), unit) if got[b:b + unit] != want[b:b + unit]]
    return "%d of %d blocks of %d bytes differ, the first at offset %d" % (len(blocks), len(want) // unit, unit, blocks[0])


def message_line(stderr):
    """The line a user reads: the first that is neither a warning nor progress."""
    for line in stderr.splitlines():
        if line.startswith("rewind: warning: ") or PROGRESS.match(line):
            continue
        return line
    return ""


def warnings(stderr):
    return [l for l in stderr.splitlines() if l.startswith("rewind: warning: ")]


def crash_summary(stderr):
    """What a crash report says crashed, and its first two frames."""
    lines = [l.strip() for l in stderr.splitlines()]
    what = [l for l in lines if (l.startswith("***") and not l.startswith("*** Signal")) or "Fatal error" in l]
    frames = [re.sub(r"\s+", " ", l) for l in lines
              if re.match(r"^[0-9]+ ", l) and "<compiler-generated>" not in l]
    keep = what[:2] + frames[:2]
    return ("; " + " | ".join(keep)) if keep else ""


def limit_files():
    """In the child: no file over 1 GiB (the volume is 4 MiB; a damaged size must not fill the
    scratch file system), refused with EFBIG rather than SIGXFSZ."""
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))


def signame(n):
    try:
        return signal.Signals(n).name
    except ValueError:
        return "signal %d" % n


class Campaign:
    def __init__(self, d):
        os.chdir(d)                # commands see short relative paths, and print them
        d = self.dir = "."
        self.rewind = os.environ["REWIND"]
        self.seed = int(os.environ["SEED"])
        self.iterations = int(os.environ.get("ITERATIONS", "2000"))
        self.only = os.environ.get("ONLY")
        self.timeout = float(os.environ.get("TIMEOUT", "20"))
        self.keep_dir = os.environ.get("KEEP_DIR", "")
        self.reused = os.environ.get("REUSE", "")
        self.pristine = os.path.join(d, "mirror")
        p = json.load(open(os.path.join(d, "points.json")))
        # (point, the image restore must give), the images kept in memory (6 x the volume)
        self.volume_size = p["size"]
        self.targets = []
        for s in p["seqs"]:
            self.targets.append(("seq:%d" % s, read(os.path.join(d, "expected", "seq-%d.img" % s))))
        name, bs = p["bookmark"]
        self.targets.append(("bookmark:%s" % name, read(os.path.join(d, "expected", "seq-%d.img" % bs))))
        self.scratch = os.path.join(d, "scratch")
        os.makedirs(self.scratch, exist_ok=True)
        self.checks = 0
        self.fails = []            # (iteration, damage, text)
        self.table = collections.defaultdict(collections.Counter)  # kind -> outcome -> n
        self.messages = collections.Counter()   # normalised message -> n
        self.example = {}                         # normalised -> one raw message
        self.kept = False
        self.command_seconds = 0.0
        self.commands = 0

    def run(self, args):
        t0 = time.monotonic()
        try:
            p = subprocess.run([self.rewind] + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=self.timeout, preexec_fn=limit_files)
            rc, err = p.returncode, p.stderr.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as e:
            rc, err = None, (e.stderr or b"").decode("utf-8", "replace")
        self.command_seconds += time.monotonic() - t0
        self.commands += 1
        return rc, err

    def note(self, line):
        norm = re.sub(r"\./scratch/[rd]\b", "MIRROR", line)
        norm = re.sub(r"0x[0-9a-fA-F]+", "0x#", norm)
        norm = re.sub(r"\d+", "#", norm)
        self.messages[norm] += 1
        self.example.setdefault(norm, line)

    def classify(self, args, expected=None, out=None):
        """Runs a command; returns (outcome, detail). outcome: exact/passed/reported or FAIL-…"""
        if out is not None and os.path.exists(out):
            os.unlink(out)
        rc, err = self.run(args)
        for w in warnings(err):
            self.note(w)
        line = message_line(err)
        if rc is None:
            return "FAIL-hang", "no exit after %g s" % self.timeout
        if rc < 0:
            return "FAIL-signal", "killed by %s%s" % (signame(-rc), crash_summary(err))
        if rc == 0:
            if expected is None:
                return "passed", ""
            if not os.path.exists(out):
                return "FAIL-wrong-image", "exit 0 and no image"
            size = os.path.getsize(out)
            if size != len(expected):
                return "FAIL-wrong-image", "exit 0 and a wrong image (%d bytes, expected %d)" % (size, len(expected))
            got = read(out)
            if got != expected:
                return "FAIL-wrong-image", "exit 0 and a wrong image (%s)" % difference(got, expected)
            return "exact", ""
        if rc == 1 and "File too large" in line:
            # the 1 GiB limit (limit_files) or the file system's: a write far past the volume's end
            return "FAIL-past-end", "wrote far past the volume's end (%d bytes) until refused: %s" % (self.volume_size, line)
        if rc == 1 and line.startswith("rewind: error: "):
            self.note(line)
            return "reported", line
        return "FAIL-exit", "exit %d, stderr: %s" % (rc, err.strip()[:300] or "(empty)")

    # --- damage ---
    def damage(self, rng, mirror):
        r = rng.randrange(sum(w for _, w in KINDS))
        for kind, w in KINDS:
            if r < w:
                break
            r -= w
        if kind.startswith("mdb"):
            rel = "journal/data.mdb"
        else:
            logs = sorted(f for f in os.listdir(os.path.join(mirror, "log"))
                          if f.endswith(".log") and os.path.getsize(os.path.join(mirror, "log", f)) > 0)
            rel = "log/" + rng.choice(logs)
        path = os.path.join(mirror, rel)
        size = os.path.getsize(path)
        off = rng.randrange(size)
        if kind.endswith("flip"):
            bit = rng.randrange(8)
            with open(path, "r+b") as f:
                f.seek(off)
                b = f.read(1)[0]
                f.seek(off)
                f.write(bytes([b ^ (1 << bit)]))
            return kind, "flipped bit %d of byte %d (0x%x) of %s (%d bytes)" % (bit, off, off, rel, size)
        os.truncate(path, off)
        return kind, "truncated %s from %d to %d bytes" % (rel, size, off)

    def fail(self, i, damage, text):
        self.fails.append((i, damage, text))
        print("FAIL: iteration %d (SEED=%d ONLY=%d): %s: %s" % (i, self.seed, i, damage, text), flush=True)
        if self.keep_dir and not self.kept and not self.reused:
            self.kept = True
            if os.path.exists(self.keep_dir):
                shutil.rmtree(self.keep_dir)
            os.makedirs(self.keep_dir)
            copy_mirror(self.pristine, os.path.join(self.keep_dir, "mirror"))
            shutil.copytree(os.path.join(self.dir, "expected"), os.path.join(self.keep_dir, "expected"))
            shutil.copy(os.path.join(self.dir, "points.json"), self.keep_dir)

    def restore(self, mirror, point, expected):
        out = os.path.join(self.scratch, "out.img")
        return self.classify(["restore", mirror, "--at", point, "--to", out, "--force"], expected, out)

    def pristine_checks(self):
        for point, expected in self.targets:
            work = os.path.join(self.scratch, "p")
            copy_mirror(self.pristine, work)
            outcome, detail = self.restore(work, point, expected)
            if outcome != "exact":
                print("FAIL: the undamaged mirror: restore --at %s: %s %s" % (point, outcome, detail))
                sys.exit(1)
            self.checks += 1
        outcome, detail = self.classify(["verify", self.pristine])
        if outcome != "passed":
            print("FAIL: verify of the undamaged mirror: %s %s" % (outcome, detail))
            sys.exit(1)
        self.checks += 1

    def iteration(self, i):
        rng = random.Random("%d:%d" % (self.seed, i))
        dmg = os.path.join(self.scratch, "d")
        work = os.path.join(self.scratch, "r")
        copy_mirror(self.pristine, dmg)
        kind, what = self.damage(rng, dmg)
        tab = self.table[kind]
        tab["iterations"] += 1
        failed = False
        copy_mirror(dmg, work)     # for restore, as damaged (verify may cut a damaged log tail)
        targets = self.targets if i % 10 == 0 else [rng.choice(self.targets)]
        # verify first: when it passes, every checkpoint is restored from the mirror it passed
        outcome, detail = self.classify(["verify", dmg])
        tab["verify " + outcome] += 1
        if outcome.startswith("FAIL"):
            failed = True
            self.fail(i, what, "verify: %s" % detail)
        else:
            self.checks += 1
        passed = outcome == "passed"
        changed = []
        for point, expected in (self.targets if passed else targets):
            outcome, detail = self.restore(dmg if passed else work, point, expected)
            tab["restore " + outcome] += 1
            if outcome != "exact":
                changed.append("%s: %s%s" % (point, outcome, (" (" + detail + ")") if detail else ""))
            if outcome.startswith("FAIL"):
                failed = True
                if not (passed and outcome == "FAIL-wrong-image"):  # that one is told below
                    self.fail(i, what, "restore --at %s: %s" % (point, detail))
            else:
                self.checks += 1
        if passed:
            if changed:
                failed = True
                tab["FAIL-verify-missed"] += 1
                self.fail(i, what, "verify exited 0 but not every point is intact: " + "; ".join(changed))
            else:
                self.checks += 1
                tab["verify passed, all exact"] += 1
        if failed:
            tab["iterations failed"] += 1

    def report(self, elapsed, n):
        cols = ["iterations", "restore exact", "restore reported", "verify passed", "verify reported",
                "verify passed, all exact", "FAIL-verify-missed", "restore FAIL-wrong-image", "restore FAIL-past-end", "restore FAIL-signal",
                "restore FAIL-hang", "restore FAIL-exit", "verify FAIL-signal", "verify FAIL-hang", "verify FAIL-exit",
                "iterations failed"]
        extra = sorted({c for t in self.table.values() for c in t} - set(cols))
        cols += extra
        used = [c for c in cols if any(self.table[k][c] for k in self.table)]
        kinds = [k for k, _ in KINDS if k in self.table]
        width = max(len(c) for c in used)
        print()
        print("%-*s %s %10s" % (width, "outcome", " ".join("%10s" % k for k in kinds), "all"))
        for c in used:
            vals = [self.table[k][c] for k in kinds]
            print("%-*s %s %10d" % (width, c, " ".join("%10d" % v for v in vals), sum(vals)))
        print("(restore rows count commands: every checkpoint when verify passed and every 10th iteration,")
        print(" else one; verify rows and FAIL-verify-missed count iterations)")
        print()
        print("messages users were shown (grouped ignoring numbers; one example each), most frequent first:")
        for norm, cnt in self.messages.most_common(20):
            print("  %5d  %s" % (cnt, self.example[norm]))
        if len(self.messages) > 20:
            print("  ... and %d more distinct messages" % (len(self.messages) - 20))
        print()
        print("%d iterations in %.1f s (%.0f ms each; %d commands, %.0f ms per command)"
              % (n, elapsed, 1000 * elapsed / max(n, 1), self.commands, 1000 * self.command_seconds / max(self.commands, 1)))
        if self.fails:
            print("%d iterations failed, seed %d; reproduce one with SEED=%d ONLY=<iteration>%s"
                  % (len({f[0] for f in self.fails}), self.seed, self.seed,
                     (" REUSE=%s" % self.keep_dir) if self.kept else ""))

    def main(self):
        print("seed %d, %s" % (self.seed, ("iteration %s only" % self.only) if self.only is not None
                                else "%d iterations" % self.iterations), flush=True)
        self.pristine_checks()
        self.commands, self.command_seconds = 0, 0.0
        t0 = time.monotonic()
        its = [int(self.only)] if self.only is not None else range(self.iterations)
        for n, i in enumerate(its):
            self.iteration(i)
            if self.only is None and (n + 1) % 250 == 0:
                print("... %d iterations, %d failed, %.0f s" % (n + 1, len({f[0] for f in self.fails}),
                                                                time.monotonic() - t0), flush=True)
        self.report(time.monotonic() - t0, len(its))
        shutil.rmtree(self.scratch, ignore_errors=True)
        print("CHECKS %d FAILS %d" % (self.checks, len(self.fails)))
        return 1 if self.fails else 0


if __name__ == "__main__":
    if sys.argv[1] == "workload":
        workload(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "campaign":
        sys.exit(Campaign(sys.argv[2]).main())
    else:
        sys.exit("usage: integrity_campaign.py workload URI SEED DIR | campaign DIR")
