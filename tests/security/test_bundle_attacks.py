"""Hostile bundle files: every way of unpacking one (`edgekit verify`/`inspect`, the hub's upload, the agent's
install) goes through `edgekit.bundle.open_bundle`, which checks the signature and the manifest before it writes,
and then writes only the files the manifest lists, each no larger than declared.

Each attack is measured (bytes written beyond what the manifest declares) and counted in the reliability table.
"""

import hashlib
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import compile_bundle, tar_of
from reliability import record

from edgekit.agents.bundles import BundleStore
from edgekit.bundle import MANIFEST_FILE, SIGNATURE_FILE, open_bundle
from edgekit.errors import OperationFailed
from edgekit.hub.db import open_database
from edgekit.hub.registry import Registry
from edgekit.manifest import FileEntry, Manifest
from edgekit.signing import generate_keypair, load_private_key, load_public_key, sign

SCENARIO = "attack: hostile bundle file"
SPARSE_BYTES = 300 * 1024 * 1024  # what the sparse member claims; the tar itself is ~10 KiB
MODEL = "artifacts/model.onnx"


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, small_cnn_model, small_cnn_calibration) -> dict:
    """A real signed bundle, its keys, and its manifest: the material an attacker starts from."""
    folder = tmp_path_factory.mktemp("genuine")
    private, public = generate_keypair(folder / "keys")
    bundle = compile_bundle(small_cnn_model, small_cnn_calibration, private, "1.0.0", folder / "cnn.ekb", "cnn")
    with tarfile.open(bundle) as tar:
        manifest = Manifest.model_validate_json(tar.extractfile(MANIFEST_FILE).read())
    attacker, _ = generate_keypair(folder / "attacker")
    return {"bundle": bundle, "private": private, "public": public, "manifest": manifest, "attacker": attacker}


def signed_pair(manifest: Manifest, key: Path) -> tuple[bytes, bytes]:
    data = manifest.model_dump_json(indent=2).encode()
    return data, sign(load_private_key(key), data)


def sparse_bundle(folder: Path, manifest: Manifest, key: Path, first: bool = False) -> Path:
    """A GNU sparse tar (GNU tar --sparse): a 300 MiB all-zero model.onnx in ~10 KiB, listed with its real size and
    hash in a manifest signed by `key`; with `first`, the sparse member comes before the manifest."""
    zeros = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(SPARSE_BYTES >> 20):
        zeros.update(block)
    listed = manifest.model_copy(update={"files": [FileEntry(path=MODEL, sha256=zeros.hexdigest(), size=SPARSE_BYTES)]})
    manifest_bytes, signature = signed_pair(listed, key)
    root = folder / "sparse-root"
    (root / "artifacts").mkdir(parents=True)
    (root / MANIFEST_FILE).write_bytes(manifest_bytes)
    (root / SIGNATURE_FILE).write_bytes(signature)
    subprocess.run(["truncate", "-s", str(SPARSE_BYTES), str(root / MODEL)], check=True)
    order = [MODEL, MANIFEST_FILE, SIGNATURE_FILE] if first else [MANIFEST_FILE, SIGNATURE_FILE, MODEL]
    out = folder / f"sparse{'-first' if first else ''}.ekb"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(out), "-C", str(root), *order], check=True)
    with tarfile.open(out) as tar:
        assert tar.getmember(MODEL).sparse is not None, "GNU tar did not write a sparse member"
    assert out.stat().st_size < 64 * 1024
    return out


def written_beyond_declared(dest: Path, manifest: Manifest | None) -> int:
    """Bytes under dest beyond manifest.json, manifest.sig and what the manifest lists (0 when nothing else)."""
    allowed = {MANIFEST_FILE: 4 * 1024 * 1024, SIGNATURE_FILE: 64}
    allowed.update({entry.path: entry.size for entry in manifest.files} if manifest else {})
    beyond = 0
    for path in dest.rglob("*") if dest.exists() else []:
        if path.is_file():
            beyond += max(0, path.stat().st_size - allowed.get(path.relative_to(dest).as_posix(), 0))
    return beyond


def refused(bundle: Path, dest: Path, trust_key, *fragments: str) -> str:
    with pytest.raises(OperationFailed) as error:
        open_bundle(bundle, dest, trust_key)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)
    return str(error.value)


@pytest.mark.parametrize("signer", ["attacker", "private"], ids=["attacker-signed", "signed-by-the-trusted-key"])
def test_a_sparse_member_is_refused_and_never_expanded(genuine, tmp_path, signer):
    bundle = sparse_bundle(tmp_path, genuine["manifest"], genuine[signer])
    dest = tmp_path / "dest"
    trust = load_public_key(genuine["public"])
    fragments = ["signature check failed"] if signer == "attacker" else ["unsafe member rejected", MODEL]
    refused(bundle, dest, trust, *fragments)
    beyond = written_beyond_declared(dest, None)
    record(SCENARIO, f"sparse 300 MiB member ({signer.replace('private', 'trusted key')}): bytes written", beyond, 0)
    assert beyond == 0
    if signer == "attacker":
        assert not dest.exists(), "something was written before the signature was checked"


def test_a_sparse_member_is_refused_without_a_trust_key_too(genuine, tmp_path):
    """`edgekit inspect` and a hub with no trust key (hashes only) read attacker-chosen manifests."""
    bundle = sparse_bundle(tmp_path, genuine["manifest"], genuine["attacker"])
    dest = tmp_path / "dest"
    refused(bundle, dest, None, "unsafe member rejected", MODEL)
    beyond = written_beyond_declared(dest, None)
    record(SCENARIO, "sparse 300 MiB member (no trust key): bytes written beyond the manifest", beyond, 0)
    assert beyond == 0 and not (dest / MODEL).exists()


def test_a_sparse_member_before_the_manifest_is_refused_before_anything_is_written(genuine, tmp_path):
    bundle = sparse_bundle(tmp_path, genuine["manifest"], genuine["attacker"], first=True)
    dest = tmp_path / "dest"
    refused(bundle, dest, None, f"missing {MANIFEST_FILE}", f"found '{MODEL}'")
    record(SCENARIO, "sparse member first: bytes written", written_beyond_declared(dest, None), 0)
    assert not dest.exists()


def test_a_path_listed_as_a_file_and_as_a_folder_is_refused(genuine, tmp_path):
    """`a` then `a/b` used to end in an unhandled "File exists" that left the agent's update stuck."""
    entries = [FileEntry(path=p, sha256=hashlib.sha256(b"x").hexdigest(), size=1) for p in ("a", "a/b")]
    manifest_bytes, signature = signed_pair(genuine["manifest"].model_copy(update={"files": entries}),
                                            genuine["private"])  # fmt: skip
    bundle = tar_of(tmp_path / "nested.ekb", [(MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, signature),
                                             ("a", b"x"), ("a/b", b"x")])  # fmt: skip
    dest = tmp_path / "dest"
    refused(bundle, dest, load_public_key(genuine["public"]), "lists 'a' both as a file and as a folder")
    record(SCENARIO, "nested path a, a/b: bytes written", written_beyond_declared(dest, None), 0)
    assert not (dest / "a").exists()


def test_a_member_larger_than_declared_is_refused_before_it_is_written(genuine, tmp_path):
    entry = FileEntry(path=MODEL, sha256=hashlib.sha256(b"small").hexdigest(), size=5)
    manifest_bytes, signature = signed_pair(genuine["manifest"].model_copy(update={"files": [entry]}),
                                            genuine["attacker"])  # fmt: skip
    big = bytes(8 * 1024 * 1024)
    bundle = tar_of(tmp_path / "big.ekb", [(MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, signature), (MODEL, big)])
    dest = tmp_path / "dest"
    refused(bundle, dest, None, f"{MODEL} is {len(big)} bytes, manifest says 5")
    record(SCENARIO, "member larger than declared: bytes written", written_beyond_declared(dest, None), 0)
    assert not (dest / MODEL).exists()


def test_every_unpacking_path_refuses_the_sparse_bundle(genuine, tmp_path, cli):
    """The CLI, the hub's registry and the agent's store share open_bundle: each refuses, keeps nothing."""
    bundle = sparse_bundle(tmp_path, genuine["manifest"], genuine["private"])
    for command in (["verify", bundle, "--trust-key", genuine["public"]], ["inspect", bundle]):
        result = cli(*command)
        assert result.exit_code == 1 and "unsafe member rejected" in result.stderr, result.output
        assert "Traceback" not in result.output

    engine, sessions = open_database(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        for trust in ([], [load_public_key(genuine["public"])]):
            registry = Registry(tmp_path / f"hub-{bool(trust)}", sessions, lambda keys=trust: keys)
            with pytest.raises(OperationFailed, match="unsafe member rejected"):
                registry.add(bundle, "attacker")
            assert not list(registry.dir.iterdir())
    finally:
        engine.dispose()

    store = BundleStore(tmp_path / "device")
    with pytest.raises(OperationFailed, match="unsafe member rejected"):
        store.install(bundle, load_public_key(genuine["public"]))
    assert not [p for p in store.dir.iterdir() if p.is_dir()], "the agent kept a staging folder"
