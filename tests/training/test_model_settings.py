"""Device settings: what a run trains with, from the device it got and the model's config (fake devices here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.modern_models import modern_model_dirs  # noqa: F401
from training.model_settings import (
    LLAMA_LIKE_MODULES,
    DeviceCapabilities,
    SettingsRequest,
    device_capabilities_detect,
    device_settings,
    model_config_read,
)

H100 = DeviceCapabilities(
    kind="cuda",
    name="NVIDIA H100 80GB HBM3",
    count=1,
    bf16=True,
    compute_capability=(9, 0),
    memory_bytes=80 * 2**30,
    flash_attn=True,
    bitsandbytes=True,
)
T4 = DeviceCapabilities(
    kind="cuda", name="Tesla T4", count=1, bf16=False, compute_capability=(7, 5), memory_bytes=16 * 2**30
)
CPU = DeviceCapabilities()
LLAMA = {"model_type": "llama"}


def test_an_ampere_or_newer_gpu_trains_in_bf16_with_flash_attention_where_nothing_is_packed() -> None:
    settings = device_settings(
        capabilities=H100, model_config=LLAMA, requested=SettingsRequest(trainer="trl")
    )
    assert (settings.device, settings.precision, settings.attn_implementation) == (
        "cuda",
        "bf16",
        "flash_attention_2",
    )
    assert settings.gradient_checkpointing is True
    assert settings.lora_target_modules == LLAMA_LIKE_MODULES
    assert settings.packing is False


def test_packed_groups_keep_sdpa_even_where_flash_attention_is_installed() -> None:
    settings = device_settings(
        capabilities=H100, model_config=LLAMA, requested=SettingsRequest(trainer="grouped")
    )
    assert (settings.attn_implementation, settings.packing) == ("sdpa", True)
    assert any("4-D mask" in note for note in settings.notes)
    unpacked = device_settings(
        capabilities=H100, model_config=LLAMA, requested=SettingsRequest(trainer="grouped", packing=False)
    )
    assert (unpacked.attn_implementation, unpacked.packing) == ("flash_attention_2", False)


def test_an_older_gpu_or_the_cpu_trains_in_float32_with_sdpa() -> None:
    for capabilities in (T4, CPU):
        settings = device_settings(capabilities=capabilities, model_config=LLAMA, requested=SettingsRequest())
        assert (settings.precision, settings.attn_implementation) == ("fp32", "sdpa")
    assert device_settings(capabilities=T4, model_config=LLAMA, requested=SettingsRequest()).notes


@pytest.mark.parametrize(
    ("config", "modules"),
    [
        ({"model_type": "qwen2"}, LLAMA_LIKE_MODULES),
        ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, LLAMA_LIKE_MODULES),
        ({"model_type": "phi3"}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        ({"model_type": "gpt2"}, None),  # peft's own default, as the demo was measured
    ],
)
def test_lora_targets_every_linear_layer_of_the_architecture_unless_the_run_names_them(
    config: dict[str, object], modules: list[str] | None
) -> None:
    assert device_settings(
        capabilities=CPU, model_config=config, requested=SettingsRequest()
    ).lora_target_modules == (modules)
    named = SettingsRequest(lora_target_modules=["q_proj"])
    assert device_settings(capabilities=CPU, model_config=config, requested=named).lora_target_modules == [
        "q_proj"
    ]
    full = SettingsRequest(peft="full")
    assert device_settings(capabilities=CPU, model_config=config, requested=full).lora_target_modules is None


def test_qlora_is_a_gpu_option_that_needs_bitsandbytes_and_lora() -> None:
    request = SettingsRequest(quantization="4bit")
    assert device_settings(capabilities=H100, model_config=LLAMA, requested=request).quantization == "4bit"
    with pytest.raises(ValueError, match="needs a GPU"):
        device_settings(capabilities=CPU, model_config=LLAMA, requested=request)
    with pytest.raises(ValueError, match="bitsandbytes"):
        device_settings(capabilities=T4, model_config=LLAMA, requested=request)
    with pytest.raises(ValueError, match="LoRA"):
        device_settings(
            capabilities=H100, model_config=LLAMA, requested=SettingsRequest(peft="ia3", quantization="4bit")
        )


def test_this_machine_and_a_saved_model_give_settings_a_run_can_record(
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    capabilities = device_capabilities_detect()
    settings = device_settings(
        capabilities=capabilities,
        model_config=model_config_read(str(modern_model_dirs["gemma"])),
        requested=SettingsRequest(),
    )
    assert settings.model_type == "gemma"
    assert json.loads(json.dumps(settings.to_dict()))["lora_target_modules"] == LLAMA_LIKE_MODULES


def test_a_run_records_its_device_settings_next_to_its_weights(
    modern_model_dirs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from training.runner import DEVICE_SETTINGS_FILENAME, RunSpec, run_training

    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"What is {n} plus 4?"},
            ],
            "completions": [[{"role": "assistant", "content": a}] for a in ("It is.", "No idea.", "Paris.")],
            "ranks": [1, 2, 3],
        }
        for n in range(4)
    ]
    grouped = tmp_path / "grouped.jsonl"
    grouped.write_text("".join(json.dumps(row) + "\n" for row in rows))

    class Quiet:
        def started(self, **_: object) -> None: ...
        def progress(self, **_: object) -> None: ...
        def heartbeat(self) -> None: ...
        def should_stop(self) -> bool:
            return False

        def log(self, line: str) -> None: ...

    spec = RunSpec.with_defaults(
        kind="dpo",
        run_id=1,
        base_model=str(modern_model_dirs["qwen2"]),
        train_file=str(grouped),
        grouped_train_file=str(grouped),
        trainer="grouped",
        test_file=None,
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=128,
    )
    result = run_training(spec, Quiet())  # type: ignore[arg-type]

    assert result.status == "succeeded"
    recorded = json.loads((tmp_path / "run" / DEVICE_SETTINGS_FILENAME).read_text())
    assert recorded["model_type"] == "qwen2" and recorded["packing"] is True
    assert recorded["lora_target_modules"] == LLAMA_LIKE_MODULES
    info = json.loads((Path(result.final_dir) / "rankwise_run.json").read_text())
    assert info["device_settings"] == recorded
    adapter = json.loads((Path(result.final_dir) / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LLAMA_LIKE_MODULES)


@pytest.mark.django_db
def test_the_run_page_shows_the_settings_the_runs_process_chose(client, settings, tmp_path: Path) -> None:
    from annotation.models import Project
    from annotation.roles import Role
    from tests.factories import user_with_roles
    from tests.training.test_builds_support import make_manager
    from training.model_settings import DEVICE_SETTINGS_FILENAME
    from training.models import DatasetBuild, TrainingRun

    # given a run whose process recorded bf16 and FlashAttention-2 in its folder
    settings.ARTIFACTS_DIR = str(tmp_path)
    manager = user_with_roles(Role.MANAGER, username="watcher")
    project = Project.objects.create(name="p", k=2)
    make_manager(project, manager)
    build = DatasetBuild.objects.create(name="b", created_by=manager, status=DatasetBuild.Status.SUCCEEDED)
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name="r",
        kind="dpo",
        dataset_build=build,
        base_model="m",
        status="running",
        output_dir="artifacts:runs/1",
    )
    chosen = device_settings(capabilities=H100, model_config=LLAMA, requested=SettingsRequest(trainer="trl"))
    (tmp_path / "runs" / "1").mkdir(parents=True)
    (tmp_path / "runs" / "1" / DEVICE_SETTINGS_FILENAME).write_text(json.dumps(chosen.to_dict()))

    # when its manager opens the run page
    client.force_login(manager)
    page = client.get(f"/training/runs/{run.pk}/").content.decode()

    # then the settings are listed with the run's own
    assert 'data-device-setting="precision">bf16<' in page
    assert 'data-device-setting="attn_implementation">flash_attention_2<' in page
    assert "q_proj, k_proj, v_proj" in page
