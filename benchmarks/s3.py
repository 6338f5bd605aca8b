"""The S3 run (`python -m benchmarks --storage s3`): both registries on one Ceph RGW, each under
its own root directory of one bucket, against the engine's own rates as the limit.

The engine is the project's single-node RGW (tests/s3/start-ceph-rgw.sh), started on free
loopback ports for the run and stopped by its PIDs, unless `--rgw FILE` names the exports of
one already running. Deleted objects are reclaimed at once (`radosgw-admin gc process`) so a
run's pushes do not fill the OSD.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from botocore.config import Config
from botocore.session import get_session

from tests.s3 import rgw

from .scenarios import MIB, BlobFile, get_blob, label_of, push_concurrent, push_large
from .servers import Server

PROBE = "engine-probe/blob"
PULL_ROUNDS = 3  # pulls take 1–2 s and vary more than pushes: three times the rounds


class Engine:
    def __init__(self, exports: Path | None) -> None:
        self._own: Path | None = None
        if exports is None:
            self._own = Path(tempfile.mkdtemp(prefix="bench-rgw-"))
            r = rgw.start(self._own, "bench", osd_size_gb=40)
            if r.returncode != 0:
                self.stop()
                raise RuntimeError(f"Ceph RGW did not start:\n{r.stderr[-3000:]}")
            text = r.stdout
        else:
            text = exports.read_text()
        self.env = rgw.exports(text)
        self.samples: dict[str, list[float]] = {"engine_put_MiB/s": [], "engine_get_MiB/s": []}
        self.bucket = self.env["S3_BUCKET"]
        self.client = get_session().create_client(
            "s3", region_name="us-east-1", endpoint_url=self.env["S3_ENDPOINT"],
            aws_access_key_id=self.env["S3_ACCESS_KEY"], aws_secret_access_key=self.env["S3_SECRET_KEY"],
            config=Config(s3={"addressing_style": "path", "payload_signing_enabled": False},
                          request_checksum_calculation="when_required"))

    def stop(self) -> None:
        if self._own is not None:
            rgw.stop(self._own)
            self._own = None

    def storage_yaml(self, root: str, redirect: bool) -> str:
        return f"""  s3:
    region: us-east-1
    regionendpoint: {self.env["S3_ENDPOINT"]}
    bucket: {self.bucket}
    accesskey: {self.env["S3_ACCESS_KEY"]}
    secretkey: {self.env["S3_SECRET_KEY"]}
    rootdirectory: {root}
    secure: false
  redirect: {{disable: {str(not redirect).lower()}}}
"""

    def empty(self, prefix: str) -> None:
        """Delete every object under `prefix` and reclaim the space at once."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        for upload in self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        self.reclaim()

    def reclaim(self) -> None:
        conf = self.env.get("CEPH_CONF")
        if conf:
            subprocess.run(["radosgw-admin", "-c", conf, "gc", "process", "--include-all"],
                           capture_output=True, timeout=600)

    # The engine's own rates, sampled in the rounds of the scenarios they bound (the RGW's speed
    # drifts as its OSD fills and warms: a probe at the start read 10% off the later rounds').

    def put_sample(self, blob: BlobFile) -> None:
        """The blob streamed in one PUT."""
        with open(blob.path, "rb") as f:
            start = time.perf_counter()
            self.client.put_object(Bucket=self.bucket, Key=PROBE, Body=f, ContentLength=blob.size)
        self.samples["engine_put_MiB/s"].append(blob.size / MIB / (time.perf_counter() - start))

    def get_sample(self, blob: BlobFile) -> None:
        """The blob read back in one GET."""
        if not self.samples["engine_put_MiB/s"]:
            self.put_sample(blob)
        start = time.perf_counter()
        body = self.client.get_object(Bucket=self.bucket, Key=PROBE)["Body"]
        while body.read(4 * MIB):
            pass
        self.samples["engine_get_MiB/s"].append(blob.size / MIB / (time.perf_counter() - start))

    def rates(self) -> dict:
        """Each rate's median (min–max) over its samples; the probe object is removed."""
        self.empty(PROBE)
        return {k: f"{round(statistics.median(v))} ({round(min(v))}–{round(max(v))})"
                for k, v in self.samples.items() if v}


class OnS3:
    """Makes a benchmark server store in the engine, under its own root directory."""

    def __init__(self, server: Server, engine: Engine, redirect: bool) -> None:
        self.server, self.engine = server, engine
        self.root = f"bench-{server.name}"
        server.storage_yaml = engine.storage_yaml("/" + self.root, redirect)
        server.forget_blob = self.forget_blob  # type: ignore[method-assign]
        engine.empty(self.root + "/")

    def forget_blob(self, digest: str) -> None:
        alg, hexd = digest.split(":")
        self.engine.empty(f"{self.root}/docker/registry/v2/blobs/{alg}/{hexd[:2]}/{hexd}/")


def pull_via_s3(server: Server, blob: BlobFile, repo: str = "bench/large") -> dict:
    """One GET of the blob, following a redirect to the engine as clients do; `redirected`
    says which way it came."""
    elapsed, redirected = get_blob(server, blob, repo, follow_redirect=True)
    return {"MiB/s": blob.size / MIB / elapsed, "redirected": redirected}


def run_suite(h, servers: list[Server], blobs: dict, args, engine: Engine, sizes: list[int]) -> None:  # noqa: ANN001
    """push_large (streamed, and in chunks), pull_large redirected then proxied, and
    push_concurrent: what issue 16 asks to be measured, each A/B/B/A like the filesystem run."""
    rounds = args.rounds
    chunk = _size(args.chunk)
    for size in sizes:
        blob = blobs[size]
        label = label_of(size)
        largest = size == sizes[-1]
        h.abba(f"s3 push_large[{label}]", servers, lambda s: push_large(s, blob), rounds,
               each_round=(lambda: engine.put_sample(blob)) if largest else None)
        h.abba(f"s3 push_large[{label},chunk={args.chunk}]", servers, lambda s: push_large(s, blob, chunk), rounds)
        h.abba(f"s3 pull_large[{label},redirect]", servers, lambda s: pull_via_s3(s, blob), rounds * PULL_ROUNDS,
               each_round=(lambda: engine.get_sample(blob)) if largest else None)
    for s in servers:  # the same store, served through the registry
        s.stop()
        s.storage_yaml = s.storage_yaml.replace("disable: false", "disable: true")
        s.start()
    for size in sizes:
        blob = blobs[size]
        label = label_of(size)
        h.abba(f"s3 pull_large[{label},proxied]", servers, lambda s: pull_via_s3(s, blob), rounds * PULL_ROUNDS)
    many = blobs["concurrent"]
    h.abba(f"s3 push_concurrent[{len(many)}x{many[0].size >> 20}MiB]", servers,
           lambda s: push_concurrent(s, many), rounds)
    for s in servers:
        for b in many:
            s.forget_blob(b.digest)


def _size(text: str) -> int:
    from .run import parse_size
    return parse_size(text)


def note(rounds: int, summaries: list[dict], names: tuple[str, str], engine: Engine, largest: int) -> str:
    """What the results say of the S3 run's sampling, and each registry's share of the engine's
    own rates in the same rounds (those of the `largest` blob, which run_suite samples)."""
    text = (f"S3 pulls take {rounds * PULL_ROUNDS} samples per server ({rounds} rounds, times {PULL_ROUNDS}: "
            "a pull lasts 1–2 s and varies more).\n"
            "The engine's own rates (Machine) are medians (min–max) of one streamed PUT at the start of each\n"
            "round of the largest streamed push, and one GET at the start of each round of its redirected pull.\n")
    limits = {"push_large": ("engine_put_MiB/s", "PUT"), "pull_large": ("engine_get_MiB/s", "GET")}
    for s in summaries:
        scenario = s["scenario"]
        kind = next((k for k in limits if f"s3 {k}[{label_of(largest)}" in scenario), None)
        rates = engine.samples[limits[kind][0]] if kind else []
        if not rates or "MiB/s" not in s:
            continue
        shares = ", ".join(f"{n} {100 * s['MiB/s'][n]['median'] / statistics.median(rates):.0f}%"
                           for n in names if n in s["MiB/s"])
        text += f"- {scenario}: {shares} of the engine's own {limits[kind][1]}\n"
    return text
