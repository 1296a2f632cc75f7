"""A site's Slurm values (haven.cluster): from a user file or HAVEN_SLURM_* variables, into rule resources."""

import pytest

from haven.cluster import SiteError, cpus_per_gpu, install_profiles, rule_resources, site_settings


def test_site_file_then_environment(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("partition: cpu\ngpu_partition: gpu\naccount: lab\ngpu_model: a100\nqos: ''\n"
                    "gpu_constraint: 'a100|h100'\ncpus_per_gpu: 6\n")
    env = {"HAVEN_SITE": str(site), "HAVEN_SLURM_ACCOUNT": "other", "HAVEN_SLURM_GPU_MODEL": ""}
    s = site_settings(env)
    # the variable wins over the file; an empty value unsets (the file's gpu_model is dropped)
    assert s == {"partition": "cpu", "gpu_partition": "gpu", "account": "other", "gpu_constraint": "a100|h100",
                 "cpus_per_gpu": 6}
    assert rule_resources("cpu", s) == {"slurm_partition": "cpu", "slurm_account": "other"}
    assert rule_resources("gpu", s) == {"slurm_partition": "gpu", "slurm_account": "other",
                                        "constraint": "a100|h100"}
    assert cpus_per_gpu(s, threads=16, gpus=4) == 6


def test_defaults_without_site(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}  # no haven/site.yaml there
    s = site_settings(env)
    assert s == {} and rule_resources("gpu", s) == {} and rule_resources("cpu", s) == {}
    assert cpus_per_gpu(s, threads=16, gpus=4) == 4 and cpus_per_gpu(s, threads=8, gpus=0) == 8
    s = site_settings({**env, "HAVEN_SLURM_PARTITION": "short", "HAVEN_SLURM_GPU_MODEL": "h100"})
    # GPU rules fall back to the CPU partition; the GPU model is for GPU rules only
    assert rule_resources("gpu", s) == {"slurm_partition": "short", "gpu_model": "h100"}
    assert rule_resources("cpu", s) == {"slurm_partition": "short"}


@pytest.mark.parametrize("text, message", [
    ("partiton: cpu\n", r"unknown key\(s\) partiton"),
    ("- cpu\n", "must be a mapping"),
    ("partition: [cpu\n", "not valid YAML"),
    ("cpus_per_gpu: many\n", "cpus_per_gpu must be an integer"),
    ("cpus_per_gpu: 0\n", "cpus_per_gpu must be >= 1"),
])
def test_bad_site_file_names_the_file(tmp_path, text, message):
    site = tmp_path / "site.yaml"
    site.write_text(text)
    with pytest.raises(SiteError, match=message) as err:
        site_settings({"HAVEN_SITE": str(site)})
    assert str(site) in str(err.value)


def test_missing_site_file_named_by_variable(tmp_path):
    with pytest.raises(SiteError, match="not a file"):
        site_settings({"HAVEN_SITE": str(tmp_path / "nope.yaml")})


def test_install_refuses_to_overwrite_a_changed_profile(tmp_path, root):
    (written,) = install_profiles(["slurm"], tmp_path)
    assert (written / "config.yaml").read_bytes() == (root / "profiles/slurm/config.yaml").read_bytes()
    install_profiles(["slurm"], tmp_path)  # the same again: fine
    (written / "config.yaml").write_text("executor: local\n")
    with pytest.raises(FileExistsError, match="--force"):
        install_profiles(["slurm"], tmp_path)
    assert (written / "config.yaml").read_text() == "executor: local\n"
    install_profiles(["slurm"], tmp_path, force=True)
    assert (written / "config.yaml").read_bytes() == (root / "profiles/slurm/config.yaml").read_bytes()
    with pytest.raises(FileNotFoundError, match="known: local, slurm"):
        install_profiles(["pbs"], tmp_path)
