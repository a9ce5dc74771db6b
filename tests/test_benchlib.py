"""What the benchmark scripts print about the machine their figures come from."""

from __future__ import annotations

import pytest

from tests.benchscripts import bench_script

ZEN1 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 sha_ni

processor\t: 1
model name\t: another block, not read
"""
ZEN4 = ZEN1.replace("23", "25").replace("model\t\t: 1", "model\t\t: 17").replace(
    "sha_ni", "avx512f avx512_vnni avx512_bf16 sha_ni")
SAPPHIRE_RAPIDS = """processor\t: 0
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile
"""
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sha2 asimddp\n"


def test_the_machine_line_tells_apart_cpus_that_share_a_model_name():
    """Both VMs call themselves "AMD EPYC"; the family and the instruction sets the model's speed
    depends on are what tells a figure's machine apart."""
    with bench_script("benchlib") as benchlib:
        assert benchlib.cpu_name(ZEN1) == "AMD EPYC (family 23 model 1; avx2)"
        assert benchlib.cpu_name(ZEN4) == "AMD EPYC (family 25 model 17; avx2, avx512f, avx512_vnni, avx512_bf16)"
        assert benchlib.cpu_name(SAPPHIRE_RAPIDS) == (
            "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143; "
            "avx2, avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_bf16, amx_int8)")
        arm = benchlib.cpu_name(ARM)  # no model name: platform's; no x86 features
        assert arm.endswith("(no AVX2)") and "family" not in arm
        here = benchlib.cpu_name()
        assert here and "\n" not in here


def test_the_tiny_checkpoints_give_vectors_of_the_dimension_named(tmp_path):
    """--model tiny768: the tests' tiny towers projecting to AltCLIP's 768 dimensions, so that search
    and storage are measured at the real vector size with an encoder that costs milliseconds."""
    from altsearch import load_model

    with bench_script("benchlib") as lib:
        for choice, dim in (("tiny", 24), ("tiny768", 768)):
            folder = lib.checkpoint_folder(choice, tmp_path)
            assert folder.name == f"{choice}-altclip"
            assert load_model(folder).encode_text(["sunset over the sea"]).shape == (1, dim)
        assert lib.checkpoint_folder("tiny768", tmp_path) == folder  # written once, then reused
        with pytest.raises(SystemExit, match="tiny768"):
            lib.checkpoint_folder("tiny-768", tmp_path)


def test_tiny_xlmr_has_the_real_tokenizer(tmp_path, real_tokenizer_json):
    """--model tiny-xlmr: tiny768 with the real 250,002-piece tokenizer (what it costs a cold query)."""
    from altsearch import load_model
    from altsearch.model.tokenizer import Tokenizer

    with bench_script("benchlib") as lib:
        folder = lib.checkpoint_folder("tiny-xlmr", tmp_path)
        assert (folder / "tokenizer.json").read_text(encoding="utf-8") == real_tokenizer_json
        model = load_model(folder)
        assert model.config.text.vocab_size == model.tokenizer.vocab_size == 250_002
        whole = Tokenizer.from_file(folder / "tokenizer.json")
        assert model.tokenizer.encode(["海边的日落"])[0].tolist() == whole.encode(["海边的日落"])[0].tolist()
        assert model.encode_text(["海边的日落"]).shape == (1, 768)


def test_a_thing_made_once_is_reused_only_when_complete_and_made_alike(tmp_path):
    """made_before: the spec file, written last, says a workdir's library or index is complete; a spec
    of other settings, or a folder gone, means making it again, and the stale spec is removed first
    (so a run killed while remaking it never leaves it looking complete)."""
    import json

    with bench_script("benchlib") as benchlib:
        folder, spec = tmp_path / "library", tmp_path / "library.json"
        want = {"n": 10, "format": 1}
        assert benchlib.made_before(spec, want, folder) is None  # never made
        folder.mkdir()
        spec.write_text(json.dumps({**want, "build_s": 2.5}))
        assert benchlib.made_before(spec, want, folder) == {**want, "build_s": 2.5}
        assert benchlib.made_before(spec, {**want, "format": 2}, folder) is None and not spec.exists()
        spec.write_text(json.dumps(want))
        folder.rmdir()
        assert benchlib.made_before(spec, want, folder) is None and not spec.exists()
