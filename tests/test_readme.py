"""README.md's first example runs as written (its "extend" comment filled with random transitions)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FILL = """from tensordict import TensorDict
rb.extend(TensorDict({"observation": torch.randn(500, 4), "action": torch.randint(2, (500,)),
    ("next", "observation"): torch.randn(500, 4), ("next", "reward"): torch.randn(500, 1),
    ("next", "done"): torch.zeros(500, 1, dtype=torch.bool),
    ("next", "terminated"): torch.zeros(500, 1, dtype=torch.bool)}, [500]))"""


def test_replay_buffer_example_runs():
    section = README.read_text().split("## LaBER in a TorchRL replay buffer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "# ... rb.extend(transitions) ..." in code
    scope: dict = {}
    exec(code.replace("# ... rb.extend(transitions) ...", FILL), scope)
    assert scope["batch"].batch_size == (32,) and scope["batch"]["index"].shape == (32,)
    assert scope["loss"].shape == ()
