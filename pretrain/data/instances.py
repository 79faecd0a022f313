"""Documents -> next-sentence-prediction pairs, faithful to google-research/bert's
`create_instances_from_document`.

For each pair: with probability `short_seq_prob` the target length is drawn from
[2, max_seq_length - 3], else it is max_seq_length - 3. (google-research/bert draws it once per
document; since a document with a short target yields many more pairs, that makes 15-30% of the
pairs short instead of the intended 10%. Drawing it again for every pair gives the 10%.) Sentences are gathered into a chunk until it
reaches the target; segment A is a random number of the chunk's leading sentences. With probability
1/2 segment B is a run of sentences from a random *other* document starting at a random sentence
and the chunk's unused sentences are put back; otherwise B is the rest of the chunk. (google-research/bert
makes B random whenever the chunk holds a single sentence, which tilts real text to ~53% random
pairs; here a one-sentence chunk with an actual-next label takes the following sentence as B, and
only a document's last sentence is forced to a random B: 50.5-51% on the project's corpus.) The pair is truncated to fit by removing tokens from the longer segment at a
random end, one at a time. Segments always start on sentence boundaries.

Documents are held flat (`TokenizedCorpus`): one array of token ids, one of word-start flags, and the
offsets of sentences and documents, so worker processes can share them as memory-mapped files.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
  ids: np.ndarray               # (tokens,) all sentences' token ids, concatenated
  word_start: np.ndarray        # (tokens,) bool: first sub-token of a word
  sentence_offsets: np.ndarray  # (sentences + 1,) start of each sentence in `ids`
  document_offsets: np.ndarray  # (documents + 1,) first sentence of each document

  @property
  def num_documents(self) -> int:
    return len(self.document_offsets) - 1

  def sentences(self, doc: int) -> range:
    return range(int(self.document_offsets[doc]), int(self.document_offsets[doc + 1]))

  def sentence_length(self, sentence: int) -> int:
    return int(self.sentence_offsets[sentence + 1] - self.sentence_offsets[sentence])

  def tokens(self, sentences: range | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and word starts of consecutive sentences."""
    if not len(sentences):
      return self.ids[:0], self.word_start[:0]
    start = int(self.sentence_offsets[sentences[0]])
    end = int(self.sentence_offsets[sentences[-1] + 1])
    return self.ids[start:end], self.word_start[start:end]


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
  max_seq_length: int = 128
  short_seq_prob: float = 0.1
  cls_id: int = 2
  sep_id: int = 3


@dataclasses.dataclass
class Instance:
  tokens_a: np.ndarray
  tokens_b: np.ndarray
  word_start_a: np.ndarray
  word_start_b: np.ndarray
  is_random_next: bool
  target_seq_length: int


def create_instances_from_document(corpus: TokenizedCorpus, doc: int, spec: InstanceSpec,
                                   rng: random.Random) -> list[Instance]:
  max_num_tokens = spec.max_seq_length - 3
  target_seq_length = _draw_target(max_num_tokens, spec.short_seq_prob, rng)

  sentences = corpus.sentences(doc)
  instances: list[Instance] = []
  chunk: list[int] = []
  chunk_length = 0
  i = 0
  while i < len(sentences):
    chunk.append(sentences[i])
    chunk_length += corpus.sentence_length(sentences[i])
    if i == len(sentences) - 1 or chunk_length >= target_seq_length:
      if chunk:
        is_random_next = rng.random() < 0.5
        if len(chunk) == 1 and not is_random_next:
          if i + 1 < len(sentences):       # B := the next sentence
            i += 1
            chunk.append(sentences[i])
          else:                            # the document's last sentence: nothing follows it
            is_random_next = True
        a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
        ids_a, ws_a = corpus.tokens(chunk[:a_end])
        if is_random_next:
          ids_b, ws_b = _random_segment(corpus, doc, target_seq_length - len(ids_a), rng)
          i -= len(chunk) - a_end          # put the unused sentences back
        else:
          ids_b, ws_b = corpus.tokens(chunk[a_end:])
        (a0, a1), (b0, b1) = _truncate_pair(len(ids_a), len(ids_b), max_num_tokens, rng)
        if a1 > a0 and b1 > b0:   # google asserts this; empty segments can only come from
          instances.append(Instance(ids_a[a0:a1], ids_b[b0:b1], ws_a[a0:a1], ws_b[b0:b1],
                                    is_random_next, target_seq_length))  # empty sentences
      chunk, chunk_length = [], 0
      target_seq_length = _draw_target(max_num_tokens, spec.short_seq_prob, rng)
    i += 1
  return instances


def _draw_target(max_num_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
  if rng.random() < short_seq_prob:
    return rng.randint(2, max_num_tokens)
  return max_num_tokens


def _random_segment(corpus: TokenizedCorpus, doc: int, target_length: int, rng: random.Random):
  """Sentences of another document from a random start until `target_length` tokens."""
  other = doc
  for _ in range(10):
    other = rng.randint(0, corpus.num_documents - 1)
    if other != doc:
      break
  sentences = corpus.sentences(other)
  start = rng.randint(0, len(sentences) - 1)
  end, length = start, 0
  for j in range(start, len(sentences)):
    length += corpus.sentence_length(sentences[j])
    end = j + 1
    if length >= target_length:
      break
  return corpus.tokens(sentences[start:end])


def _truncate_pair(len_a: int, len_b: int, max_num_tokens: int, rng: random.Random):
  """Half-open kept ranges of A and B: drop tokens from the longer one, at a random end."""
  a0, a1, b0, b1 = 0, len_a, 0, len_b
  while (a1 - a0) + (b1 - b0) > max_num_tokens:
    if (a1 - a0) > (b1 - b0):
      if rng.random() < 0.5:
        a0 += 1
      else:
        a1 -= 1
    elif rng.random() < 0.5:
      b0 += 1
    else:
      b1 -= 1
  return (a0, a1), (b0, b1)


def pack(instances: list[Instance], spec: InstanceSpec, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Fixed-length arrays: [CLS] A [SEP] B [SEP] [PAD]..., segment ids, lengths, word starts, NSP."""
  n, s = len(instances), spec.max_seq_length
  ids = np.full((n, s), pad_id, np.int32)
  segment_ids = np.zeros((n, s), np.uint8)
  word_start = np.zeros((n, s), np.uint8)
  lengths = np.zeros(n, np.int32)
  labels = np.zeros(n, np.uint8)
  for row, inst in enumerate(instances):
    la, lb = len(inst.tokens_a), len(inst.tokens_b)
    length = la + lb + 3
    ids[row, 0] = spec.cls_id
    ids[row, 1:1 + la] = inst.tokens_a
    ids[row, 1 + la] = spec.sep_id
    ids[row, 2 + la:2 + la + lb] = inst.tokens_b
    ids[row, length - 1] = spec.sep_id
    segment_ids[row, 2 + la:length] = 1
    word_start[row, 1:1 + la] = inst.word_start_a
    word_start[row, 2 + la:2 + la + lb] = inst.word_start_b
    lengths[row] = length
    labels[row] = inst.is_random_next     # NSP label 1 = B is random (not next), as in BERT
  return {"input_ids": ids, "segment_ids": segment_ids, "word_start": word_start,
          "lengths": lengths, "next_sentence_labels": labels}
