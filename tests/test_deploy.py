"""deploy/: the compose file, the Kubernetes values and the SLURM set-up say what they must
(images, commands, GPU resources, a dashboard not open to the network), and the SLURM job
script voxelmill generates carries the directives and worker resources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.cluster import ClusterOptions, connect, slurm_settings
from engine.errors import OptionError
from tests.conftest import REPO, run_cli, write_mrc

DEPLOY = REPO / "deploy"


def test_compose_services():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"scheduler", "worker", "gpu-worker", "cli"} <= set(services)
    assert services["scheduler"]["command"].startswith("dask scheduler --port 8786")
    assert all(p.startswith("127.0.0.1:") for p in services["scheduler"]["ports"])
    for name in ("worker", "gpu-worker"):
        assert services[name]["command"].startswith("dask worker tcp://scheduler:8786")
        assert "./data:/data" in services[name]["volumes"]
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
    assert gpu["extraArgs"] == ["--resources", "GPU=1"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert values["scheduler"]["serviceType"] == "ClusterIP"  # not exposed publicly
    for group in (values["worker"], gpu):
        assert group["mounts"]["volumeMounts"][0]["mountPath"] == "/data"


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
    assert "--resources GPU=2" in script and "--nthreads 8" in script


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
