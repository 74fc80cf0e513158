"""Runs inside a test cgroup; performs one access and prints the outcome as JSON."""

import json
import os
import sys


def main() -> None:
    op, path = sys.argv[1], sys.argv[2]
    try:
        if op == "open":
            flags = 0
            for name in (sys.argv[3] if len(sys.argv) > 3 else "O_RDONLY").split("|"):
                flags |= getattr(os, name)
            fd = os.open(path, flags)
            os.close(fd)
        elif op == "read":
            with open(path, "rb") as fh:
                fh.read()
        elif op == "reopen_opath":
            fd = os.open(path, os.O_PATH)  # O_PATH never reaches file_open
            print(json.dumps({"stage": "opath_ok"}), flush=True)
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            os.close(fd2)
        elif op == "exec":
            os.execv(path, [path] + sys.argv[3:])
        elif op == "hold":
            # open before the policy, wait for the go, then read through the old fd
            fd = os.open(path, os.O_RDONLY)
            print(json.dumps({"stage": "opened"}), flush=True)
            sys.stdin.readline()
            data = os.pread(fd, 64, 0)
            os.close(fd)
            print(json.dumps({"ok": True, "read": len(data)}))
            return
        elif op == "mmap_exec":
            import mmap

            with open(path, "rb") as fh:
                mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()
        else:
            raise SystemExit(f"unknown op {op}")
        print(json.dumps({"ok": True}))
    except OSError as e:
        print(json.dumps({"errno": e.errno}))


if __name__ == "__main__":
    main()
