import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_glm_is_lean():
    out = _run("import sys, glm; print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('torch', 'triton', 'gradio', 'sentencepiece', 'ray', 'llguidance', 'jieba', 'nltk', "
               "'rouge_chinese')))")
    assert out == "[]"  # torch itself loads on first use


def test_plain_glm_serve_never_imports_ray():
    # Only --replicas/--autoscale import it (glm.cluster, lazily); glm-serve's parser and app do not.
    out = _run("import sys, fastapi, uvicorn, prometheus_client, glm.serve\n"
               "glm.serve.build_parser().parse_args(['--replicas', '2'])\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    assert out == "[]"


def test_loading_and_chatting_on_cpu_never_loads_our_triton_kernels_or_gradio_nor_touches_cuda():
    # (torch itself may import triton when it is installed: meta-device init goes through torch._dynamo. The CPU
    # kernel, glm.kernels.cpu_wq, is what a quantized CPU model runs.)
    out = _run(
        "import sys, glm, torch\n"
        "m = glm.load('tests/fixtures/chatglm-tiny', quant=4)\n"
        "m.chat('你好', max_length=12, do_sample=False)\n"
        "print('glm.kernels.wq_gemv' in sys.modules, 'gradio' in sys.modules, torch.cuda.is_initialized())"
    )
    assert out == "False False False"


def test_a_float_load_imports_neither_glm_quant_nor_the_cpu_kernel():
    # Only a quantized checkpoint or quant= needs them; a quant=4 load in the same process shows the probe works.
    # Nor torch._dynamo, seconds of every process's start-up (a meta-device op would import it); compiling does.
    out = _run(
        "import sys, glm\n"
        "glm.load('tests/fixtures/chatglm-tiny')\n"
        "print('glm.quant' in sys.modules, 'glm.kernels.cpu_wq' in sys.modules, 'torch._dynamo' in sys.modules)\n"
        "glm.load('tests/fixtures/chatglm-tiny', quant=4)\n"
        "print('glm.quant' in sys.modules)"
    )
    assert out.split() == ["False", "False", "False", "True"]
