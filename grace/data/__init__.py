"""LLaVA-format conversation data, read lazily: a compact record index built at start-up
(:mod:`grace.data.index`), each sample encoded (image opened, chat template rendered, tokenized, labels built)
only when a DataLoader worker needs it (:mod:`grace.data.encode`), in a deterministic order that does not
depend on the number of workers or ranks (:mod:`grace.data.stream`).

Format (ShareGPT4V / LLaVA mixtures): a JSON list of
    {"id": ..., "image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                 {"from": "gpt", "value": "..."}, ...]}

Bad samples (empty or malformed conversation, no assistant turn, image and ``<image>`` placeholder not
matching, missing or unreadable image, longer than ``max_length``, ...) are never trained on and never
fatal: they are found when drawn, counted by reason and replaced by a substitute chosen from the stream
position alone (see :class:`SampleStream`).
"""

from grace.data.encode import (  # noqa: F401
    IGNORE,
    ROLES,
    ConversationDataset,
    SkipSample,
    assistant_labels,
    collate,
    end_assistant_turns,
    end_tokens_of,
    load_image,
    parse_record,
    template_ends_turns,
    to_messages,
)
from grace.data.index import MAX_RECORD_BYTES, RecordIndex, load_records  # noqa: F401
from grace.data.stream import (  # noqa: F401
    GROUP_CHUNK,
    MAX_DRAWS,
    SampleOrder,
    SampleStream,
    build_loader,
    check_usable,
)
