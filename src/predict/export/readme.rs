//! The `README.md` written next to an exported model.

use crate::backbone::Family;
use crate::fit::run_dir::RunConfig;

/// The README for run `rc` (method `method`, backbone `family`, texts
/// truncated at `max_len` tokens): what the files are and a runnable
/// Python example (onnxruntime, tokenizers, numpy).
pub(super) fn readme(rc: &RunConfig, method: &str, family: Family, max_len: usize) -> String {
    let (types_feed, types_note) = match family {
        Family::Bert => (
            "\n    feed[\"token_type_ids\"] = pad([e.type_ids for e in encs])",
            "`input_ids`, `attention_mask` and `token_type_ids`",
        ),
        Family::Mpnet => ("", "`input_ids` and `attention_mask`"),
    };
    format!(
        r#"# sherl run {run_id} ({method}), exported

`model.onnx` is the whole classifier: the backbone layers the run reads, the
trained modules and the head, exported by `sherl-fit export`. It takes
{types_note} (int64, `[batch, seq]`, padded on the right with
`attention_mask` 0) and returns `logits` and `probabilities`
(float32, `[batch, classes]`); `labels.json` names the classes in order.
`tokenizer.json` truncates at {max_len} tokens, as the run was trained, and
does not pad.

```python
import json

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

tok = Tokenizer.from_file("tokenizer.json")
labels = json.load(open("labels.json"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])


def pad(rows):
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)


def classify(texts):
    encs = tok.encode_batch(texts)
    feed = {{"input_ids": pad([e.ids for e in encs]),
            "attention_mask": pad([e.attention_mask for e in encs])}}{types_feed}
    probs = session.run(["probabilities"], feed)[0]
    return [(labels[p.argmax()], float(p.max())) for p in probs]


print(classify(["a first text", "and another one"]))
```

Sentence-pair runs: pass `tok.encode_batch(list(zip(first, second)))`.
"#,
        run_id = rc.run_id,
    )
}
