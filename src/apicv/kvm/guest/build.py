"""Assemble the guest agent (agent.S) into a flat binary, once, and cache it.

``as --64`` assembles agent.S with the host's constants passed as ``--defsym`` symbols, and
``objcopy -O binary`` extracts .text. The result is cached in ``$XDG_CACHE_HOME/apicv`` (or
``~/.cache/apicv``) under a name keyed by a hash of the source and the symbols, so it is rebuilt
only when either changes. The binary is position independent; its header says where the entry
point, the IDT stubs, the SMM handler and the reset stub are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("agent.S")
MAGIC = b"APICVAG1"
_HEADER = struct.Struct("<8s6I")


class AgentBuildError(RuntimeError):
    """The agent could not be assembled (no binutils, or the assembler failed)."""


@dataclass(frozen=True)
class Agent:
    """The assembled agent and the offsets its header gives."""

    image: bytes
    entry: int
    stubs: tuple[int, ...]  # offset of the IDT stub of each vector 0-255
    smm_handler: bytes
    reset_stub: bytes


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apicv"


def _key(source: bytes, defsyms: dict[str, int]) -> str:
    h = hashlib.sha256(source)
    for k in sorted(defsyms):
        h.update(f"\0{k}={defsyms[k]}".encode())
    return h.hexdigest()[:20]


def _assemble(source: Path, defsyms: dict[str, int], out: Path) -> None:
    for tool in ("as", "objcopy"):
        if shutil.which(tool) is None:
            raise AgentBuildError(f"'{tool}' not found: install binutils to use the KVM backend")
    with tempfile.TemporaryDirectory(prefix="apicv-agent-") as tmp:
        obj = os.path.join(tmp, "agent.o")
        binf = os.path.join(tmp, "agent.bin")
        cmd = ["as", "--64", "-o", obj]
        for k, v in sorted(defsyms.items()):
            cmd += ["--defsym", f"{k}={v}"]
        cmd.append(str(source))
        for c in (cmd, ["objcopy", "-O", "binary", "-j", ".text", obj, binf]):
            r = subprocess.run(c, capture_output=True, text=True, check=False)
            if r.returncode:
                raise AgentBuildError(f"{' '.join(c[:2])} failed:\n{r.stderr.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        # publish atomically: concurrent builders race harmlessly
        fd, tmpname = tempfile.mkstemp(dir=out.parent, prefix=".agent-")
        with os.fdopen(fd, "wb") as f, open(binf, "rb") as src:
            f.write(src.read())
        os.replace(tmpname, out)


def parse(image: bytes) -> Agent:
    magic, entry, stub_table, smm, smm_len, reset, reset_len = _HEADER.unpack_from(image)
    if magic != MAGIC:
        raise AgentBuildError("the agent binary has no APICVAG1 header")
    stubs = struct.unpack_from("<256I", image, stub_table)
    return Agent(image, entry, stubs, image[smm:smm + smm_len], image[reset:reset + reset_len])


_built: dict[str, Agent] = {}


def build(defsyms: dict[str, int], source: Path = SOURCE) -> Agent:
    """The agent assembled with these symbols (from the cache when it is there)."""
    text = source.read_bytes()
    key = _key(text, defsyms)
    agent = _built.get(key)
    if agent is not None:
        return agent
    path = cache_dir() / f"agent-{key}.bin"
    image = None
    try:
        image = path.read_bytes()
        agent = parse(image)
    except (OSError, AgentBuildError, struct.error):
        agent = None
    if agent is None:
        try:
            _assemble(source, defsyms, path)
            agent = parse(path.read_bytes())
        except OSError:
            # an unwritable cache: assemble into a private directory instead
            with tempfile.TemporaryDirectory(prefix="apicv-agent-") as tmp:
                p = Path(tmp) / "agent.bin"
                _assemble(source, defsyms, p)
                agent = parse(p.read_bytes())
    _built[key] = agent
    return agent
