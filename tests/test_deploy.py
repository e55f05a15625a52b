"""deploy/: the compose file, the Kubernetes values and the SLURM set-up say what they must
(images, commands, GPU resources, a dashboard not open to the network), and the SLURM job
script voxelmill generates carries the directives and worker resources."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.cluster import (
    ClusterOptions,
    connect,
    local_cluster_shape,
    no_workers_timeout,
    slurm_settings,
)
from engine.errors import OptionError
from tests.conftest import REPO, run_cli, write_mrc

DEPLOY = REPO / "deploy"


@pytest.mark.parametrize(("cores", "workers", "threads", "gil", "shape"), [
    (1, None, None, False, (1, 1)), (2, None, None, False, (1, 2)), (4, None, None, False, (1, 4)),
    (16, None, None, False, (4, 4)),
    (1, None, None, True, (1, 1)), (2, None, None, True, (2, 1)), (16, None, None, True, (16, 1)),
    (16, None, 1, False, (16, 1)), (16, None, 2, True, (8, 2)), (2, None, 1, False, (2, 1)),
    (16, 3, None, True, (3, 5)), (2, 1, None, True, (1, 2)), (2, 1, 3, False, (1, 3)),
])
def test_embedded_cluster_shape(cores, workers, threads, gil, shape):
    """One worker per four cores with the cores as its threads; for GIL-bound commands one
    single-threaded worker per core; what the options give is kept, and the workers fill
    the cores around it."""
    options = ClusterOptions(workers=workers, threads_per_worker=threads, gil_bound=gil)
    assert local_cluster_shape(options, cores=cores) == shape



def test_compose_services():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"scheduler", "worker", "gpu-worker", "cli"} <= set(services)
    assert services["scheduler"]["command"].startswith("dask scheduler --port 8786")
    assert all(p.startswith("127.0.0.1:") for p in services["scheduler"]["ports"])
    for name in ("worker", "gpu-worker"):
        assert services[name]["command"].startswith("dask worker tls://scheduler:8786")
        assert "./data:/data" in services[name]["volumes"]
    # TLS with mutual authentication: every component mounts the certificates
    assert "--protocol tls" in services["scheduler"]["command"]
    # a run left without workers stops (exit 75, resumable) instead of waiting forever
    env = services["scheduler"]["environment"]
    assert env["DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT"] == "600s"
    for name, role in (("scheduler", "scheduler"), ("worker", "worker"),
                       ("gpu-worker", "worker")):
        command = services[name]["command"]
        assert (f"--tls-ca-file /certs/ca.crt --tls-cert /certs/{role}.crt "
                f"--tls-key /certs/{role}.key") in command, command
    for svc in services.values():
        assert "./certs:/certs:ro" in svc["volumes"]
    assert "voxelmill --tls /certs" in (DEPLOY / "compose" / "docker-compose.yml").read_text()
    gpu = services["gpu-worker"]
    assert "--resources GPU=1" in gpu["command"] and gpu["image"] == "voxelmill:cuda"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for svc in services.values():  # every Dockerfile a service builds exists
        if "build" in svc:
            assert (REPO / svc["build"]["dockerfile"]).is_file()
    cpu = (DEPLOY / "compose" / "Dockerfile").read_text()
    assert "-c constraints.txt" in cpu and ".[learn]" in cpu
    cuda = (DEPLOY / "compose" / "Dockerfile.cuda").read_text()
    assert "-c constraints.txt" not in cuda.split("RUN", 1)[1]  # torch comes from the image


def test_kubernetes_values():
    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    assert values["worker"]["image"]["tag"] == "cpu"
    (gpu,) = values["additional_worker_groups"]
    assert gpu["image"]["tag"] == "cuda"
    assert gpu["extraArgs"][:2] == ["--resources", "GPU=1"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert values["scheduler"]["serviceType"] == "ClusterIP"  # not exposed publicly
    for group in (values["worker"], gpu):
        assert group["mounts"]["volumeMounts"][0]["mountPath"] == "/data"
    # TLS: workers mount the Secret and pass the flags; the scheduler reads the Secret
    # through Dask's configuration variables and listens on tls://
    tls_flags = ["--tls-ca-file", "/certs/ca.crt", "--tls-cert", "/certs/worker.crt",
                 "--tls-key", "/certs/worker.key"]
    for group in (values["worker"], gpu):
        assert group["extraArgs"][-6:] == tls_flags
        assert group["custom_scheduler_url"] == "tls://voxelmill-scheduler:8786"
        (secret,) = [v for v in group["mounts"]["volumes"] if "secret" in v]
        assert secret["secret"]["secretName"] == "voxelmill-tls"
        (mount,) = [m for m in group["mounts"]["volumeMounts"] if m["name"] == secret["name"]]
        assert mount["mountPath"] == "/certs" and mount["readOnly"]
    scheduler = values["scheduler"]
    assert scheduler["extraArgs"] == ["--protocol", "tls"]
    env = {e["name"]: e for e in scheduler["env"]}
    for var, key in (("CA_FILE", "ca.crt"), ("SCHEDULER__CERT", "scheduler.crt"),
                     ("SCHEDULER__KEY", "scheduler.key")):
        ref = env[f"DASK_DISTRIBUTED__COMM__TLS__{var}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "voxelmill-tls", "key": key}
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"]["value"] == "True"
    assert env["DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT"]["value"] == "600s"
    assert values["fullnameOverride"] == "voxelmill"


def test_slurm_job_script_has_directives_and_gpu_resources():
    from dask_jobqueue import SLURMCluster

    opts = ClusterOptions(cluster="slurm", jobs=2, gpus_per_job=2,
                          jobqueue_config=str(DEPLOY / "slurm" / "jobqueue.yaml"))
    settings = slurm_settings(opts)
    with SLURMCluster(**settings, scheduler_options={
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p normal", "#SBATCH -A mylab", "#SBATCH -t 04:00:00",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=", "#SBATCH --gres=gpu:2"):
        assert line in script, line
    # --gpus-per-job K: K workers per job (one per GPU), each advertising GPU=1
    assert "--resources GPU=1" in script and "--nworkers 2" in script, script
    assert "--nthreads 4" in script
    # the embedded cluster's worker settings, where the job's environment has none
    for name, value in (("MALLOC_ARENA_MAX", "4"), ("MALLOC_MMAP_THRESHOLD_", "33554432"),
                        ("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "100ms"),
                        ("DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL", "100ms")):
        assert f'export {name}="${{{name}:-{value}}}"' in script, name


def test_deployed_workers_get_the_embedded_cluster_settings():
    """The compose services' and the Helm worker groups' environment is what
    job_worker_environ gives for their threads (allocator, lighter event loops)."""
    from engine.cluster import job_worker_environ

    services = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())[
        "services"]
    for name in ("worker", "gpu-worker"):
        threads = int(services[name]["command"].split("--nthreads ")[1].split()[0])
        assert services[name]["environment"] == job_worker_environ(threads), name
    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    for group in (values["worker"], *values["additional_worker_groups"]):
        env = {e["name"]: e["value"] for e in group["env"]}
        assert env == job_worker_environ(group["threads_per_worker"]), group.get("name")


def test_missing_worker_settings(monkeypatch):
    """What a worker's environment lacks of the allocator settings (the connect hint)."""
    import platform

    from engine.cluster import missing_worker_settings

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    expected = ["MALLOC_MMAP_THRESHOLD_"] if platform.libc_ver()[0] == "glibc" else []
    assert missing_worker_settings() == expected
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert missing_worker_settings() == []


def test_slurm_without_dask_jobqueue_is_one_message(monkeypatch, tmp_path: Path):
    """Without dask-jobqueue, --cluster slurm says how to install it (no ImportError)."""
    import sys

    from engine.cluster import slurm_cluster
    from engine.errors import OptionError

    config = tmp_path / "jobqueue.yaml"
    config.write_text(yaml.safe_dump({"jobqueue": {"slurm": {"cores": 8, "memory": "32GiB"}}}))
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import raises ImportError
    opts = ClusterOptions(cluster="slurm", jobs=1, jobqueue_config=str(config))
    with pytest.raises(OptionError, match="pip install dask-jobqueue"):
        slurm_cluster(opts)


@pytest.mark.parametrize(("section", "gil", "gpus", "processes"), [
    ({"cores": 8}, True, 0, 8), ({"cores": 8}, False, 0, 2), ({"cores": 2}, False, 0, 1),
    ({"cores": 16}, False, 0, 4), ({"cores": 8, "processes": 2}, True, 0, 2),
    ({"cores": 8}, True, 2, 2),
])
def test_slurm_jobs_share_their_cores_as_the_embedded_cluster(tmp_path: Path, section, gil,
                                                               gpus, processes):
    """Without ``processes`` in the file a job's cores are shared out as the embedded
    cluster's (one single-threaded worker per core for a GIL-bound command; dask-jobqueue
    alone would give 8 cores 4 workers of 2 threads, 16 cores 4 of 4); the file's ``processes`` and
    ``--gpus-per-job`` are kept; the job's allocator settings follow its threads."""
    config = tmp_path / "jobqueue.yaml"
    config.write_text(yaml.safe_dump({"jobqueue": {"slurm": {"memory": "32GiB", **section}}}))
    settings = slurm_settings(ClusterOptions(cluster="slurm", jobs=1, gil_bound=gil,
                                             gpus_per_job=gpus, jobqueue_config=str(config)))
    assert settings["processes"] == processes
    threads = section["cores"] // processes
    assert f'export MALLOC_ARENA_MAX="${{MALLOC_ARENA_MAX:-{threads}}}"' in settings[
        "job_script_prologue"]


def test_shipped_jobqueue_file_gives_segment_a_worker_per_core():
    """deploy/slurm/jobqueue.yaml leaves ``processes`` out: its 8-core jobs run segment on 8
    single-threaded workers and convert on 2 of 4 threads (the job script says so)."""
    from dask_jobqueue import SLURMCluster

    for gil, shape in ((True, ("--nthreads 1 ", "--nworkers 8 ")),
                       (False, ("--nthreads 4 ", "--nworkers 2 "))):
        opts = ClusterOptions(cluster="slurm", jobs=1, gil_bound=gil,
                              jobqueue_config=str(DEPLOY / "slurm" / "jobqueue.yaml"))
        with SLURMCluster(**slurm_settings(opts), scheduler_options={
                "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}) as cluster:
            script = cluster.job_script()
        assert all(arg in script for arg in shape), script
        assert "#SBATCH --cpus-per-task=8" in script


def test_gil_bound_commands_on_threaded_workers_get_a_note():
    """A GIL-bound command on CPU workers of several threads gets one line saying to run
    single-threaded workers; single-threaded workers, and GPU workers of any threads, none."""
    from engine.cluster import gil_threads_hint

    one = {"nthreads": 1, "resources": {}}
    gpu = {"nthreads": 3, "resources": {"GPU": 1}}
    assert gil_threads_hint({"a": one, "b": one, "g": gpu}) is None
    assert gil_threads_hint({}) is None
    note = gil_threads_hint({"a": one, "b": {"nthreads": 4}, "g": gpu})
    assert note is not None and "4 threads" in note and "--nthreads 1" in note


def test_job_workers_keep_what_the_user_configured():
    """A loop interval configured away from distributed's default is not overridden in
    the job's workers; the allocator settings follow the threads per worker."""
    import dask

    # its config defaults must exist before config.set: leaving the set() would otherwise
    # remove the whole distributed section that importing distributed inside it created
    # (later clusters in this process then failed with KeyError: 'distributed')
    import distributed  # noqa: F401

    from engine.cluster import job_worker_environ

    with dask.config.set({"distributed.admin.tick.interval": "50ms"}):
        env = job_worker_environ(3)
    assert "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL" not in env
    assert env["DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL"] == "100ms"
    assert env["MALLOC_ARENA_MAX"] == "3"


def test_no_workers_timeout_follows_worker_timeout():
    """A fixed-size SLURM cluster's scheduler fails waiting tasks after --worker-timeout
    seconds without a worker; not with --adaptive (no job until there is work), not with 0
    (wait forever), and not over a timeout the user's dask configuration sets."""
    import dask

    key = "distributed.scheduler.no-workers-timeout"
    fixed = ClusterOptions(cluster="slurm", jobs=2, worker_timeout=90)
    assert no_workers_timeout(fixed) == {key: "90s"}
    assert no_workers_timeout(ClusterOptions(cluster="slurm", jobs=2, worker_timeout=0)) == {}
    assert no_workers_timeout(ClusterOptions(cluster="slurm", jobs=2, adaptive=True)) == {}
    with dask.config.set({key: "1h"}):
        assert no_workers_timeout(fixed) == {}
    with dask.config.set(no_workers_timeout(fixed)):
        assert dask.config.get(key) == "90s"


def test_slurm_job_script_with_tls(tmp_path: Path):
    import dask

    # its config defaults must exist before config.set, or leaving the set() below removes
    # the whole jobqueue section it created
    import dask_jobqueue  # noqa: F401

    from engine.cluster import slurm_cluster
    from engine.security import load_security, make_certificates

    made = make_certificates(tmp_path / "certs")
    opts = ClusterOptions(cluster="slurm", jobs=1, tls=str(made.directory),
                          jobqueue_config=str(DEPLOY / "slurm" / "jobqueue.yaml"))
    with dask.config.set({"jobqueue.slurm.scheduler-options": {
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}):
        cluster = slurm_cluster(opts, security=load_security(made.directory))
    with cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        script = cluster.job_script()
    assert f"--tls-cert {made.certs['worker']}" in script
    assert f"--tls-key {made.keys['worker']}" in script
    assert f"--tls-ca-file {made.ca_cert}" in script and "tls://" in script
    assert "voxelmill --tls" in (DEPLOY / "slurm" / "jobqueue.yaml").read_text()


def test_slurm_configuration_errors(tmp_path: Path):
    bad = tmp_path / "jq.yaml"
    bad.write_text("jobqueue:\n  slurm:\n    queue: normal\n")
    with pytest.raises(OptionError, match="jobqueue.slurm needs cores, memory"):
        slurm_settings(ClusterOptions(cluster="slurm", jobs=1, jobqueue_config=str(bad)))
    with pytest.raises(OptionError, match="--jobs N"):
        slurm_settings(ClusterOptions(cluster="slurm", jobqueue_config=str(bad)))
    with pytest.raises(OptionError, match="no such file"):
        slurm_settings(ClusterOptions(cluster="slurm", jobs=1,
                                      jobqueue_config=str(tmp_path / "nope.yaml")))
    for section, message in (
            ("cores: eight", "cores 'eight': expected a whole number ≥ 1"),
            ("cores: 0", "cores 0: expected a whole number ≥ 1"),
            ("cores: true", "cores True: expected a whole number ≥ 1"),
            ("cores: 2.5", "cores 2.5: expected a whole number ≥ 1"),
            ("{cores: 2, processes: many}", "processes 'many': expected a whole number ≥ 1"),
            ("{cores: 2, processes: 4}", r"processes \(4\) is more than cores \(2\)")):
        bad.write_text(f"jobqueue:\n  slurm: {{memory: 4GiB, {section.strip('{}')}}}\n")
        with pytest.raises(OptionError, match=f"{bad}: jobqueue.slurm {message}"):
            slurm_settings(ClusterOptions(cluster="slurm", jobs=1, jobqueue_config=str(bad)))
    bad.write_text("jobqueue:\n  slurm: {memory: 4GiB, cores: 2}\n")
    with pytest.raises(OptionError, match="--gpus-per-job 3: more than the 2 cores of a job"):
        slurm_settings(ClusterOptions(cluster="slurm", jobs=1, gpus_per_job=3,
                                      jobqueue_config=str(bad)))
    bad.write_text("slurm: {cores: 2}\n")
    with pytest.raises(OptionError, match="no jobqueue: slurm: section"):
        slurm_settings(ClusterOptions(cluster="slurm", jobs=1, jobqueue_config=str(bad)))
    with pytest.raises(OptionError, match="--cluster 'pbs'"):
        with connect(ClusterOptions(cluster="pbs")):
            pass


def test_cli_cluster_errors_exit_2(tmp_path: Path):
    src = write_mrc(tmp_path / "a.mrc", np.zeros((4, 8, 8), np.float32))
    res = run_cli("--cluster", "slurm", "--jobs", "2", "convert", str(src),
                  str(tmp_path / "a.ome.zarr"))
    assert res.returncode == 2 and "--jobqueue-config" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("--cluster", "pbs", "convert", str(src), str(tmp_path / "a.ome.zarr"))
    assert res.returncode == 2 and "expected one of local, slurm" in res.stderr
    res = run_cli("--worker-timeout", "-1", "convert", str(src), str(tmp_path / "a.ome.zarr"))
    assert res.returncode == 2 and "--worker-timeout -1: must be ≥ 0" in res.stderr
    config = tmp_path / "jq.yaml"
    config.write_text("jobqueue:\n  slurm: {cores: eight, memory: 4GiB}\n")
    res = run_cli("--cluster", "slurm", "--jobs", "1", "--jobqueue-config", str(config),
                  "convert", str(src), str(tmp_path / "a.ome.zarr"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{config}: jobqueue.slurm cores 'eight'" in " ".join(res.stderr.split())
    assert not (tmp_path / "a.ome.zarr").exists()


@pytest.mark.parametrize("action", ["start", "stop"])
def test_ci_cluster_refuses_a_foreign_slurm_configuration(tmp_path: Path, action: str):
    """On a machine with its own SLURM configuration, ``ci-cluster.sh`` neither replaces it
    nor starts or stops anything: it refuses first, naming the file. Its own files (the
    marker line, or the gres.conf of versions before the marker) pass the same check."""
    script = DEPLOY / "slurm" / "ci-cluster.sh"
    foreign = "# site configuration\nClusterName=production\n"
    (tmp_path / "slurm.conf").write_text(foreign)
    (tmp_path / "gres.conf").write_text("# two fake GPUs: slurm needs a File per GPU, …\n")
    res = subprocess.run(["bash", str(script), action], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin",
                                          "SLURM_CI_CONF_DIR": str(tmp_path)})
    assert res.returncode == 1, res
    assert f"{tmp_path}/slurm.conf was not written by this script" in res.stderr
    assert (tmp_path / "slurm.conf").read_text() == foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gres.conf", "slurm.conf"]
    # a gres.conf that is not the script's is refused the same way
    (tmp_path / "slurm.conf").write_text("# written by deploy/slurm/ci-cluster.sh\n")
    (tmp_path / "gres.conf").write_text("NodeName=n1 Name=gpu File=/dev/nvidia0\n")
    res = subprocess.run(["bash", str(script), action], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin",
                                          "SLURM_CI_CONF_DIR": str(tmp_path)})
    assert res.returncode == 1 and "gres.conf was not written by this script" in res.stderr
