"""Annotators: the offline heuristic, sentence statistics, and the chat-endpoint annotator with a fake transport."""

import io
import json
import urllib.error

import pytest

from steering import annotate

# --------------------------------------------------------------------------------------------------------------------
# Sentences


def test_sentence_spans_strip_whitespace_and_keep_decimals():
    text = "  First, 3.5 + 1 = 4.5.  Wait!\n\nIs it?Yes.\nDone"
    spans = annotate.sentence_spans(text)
    assert [text[a:b] for a, b in spans] == ["First, 3.5 + 1 = 4.5.", "Wait!", "Is it?Yes.", "Done"]
    assert annotate.sentence_spans("") == [] and annotate.sentence_spans(" \n ") == []


@pytest.mark.parametrize("sentence,label", [
    ("Wait, that can't be right.", "backtracking"),
    ("But 7 is odd, so this fails.", "backtracking"),
    ("Alternatively, we could factor the polynomial.", "backtracking"),
    ("Hmm, let me look again.", "backtracking"),
    ("Hmmm.", "backtracking"),
    ("Let me reconsider the whole setup.", "backtracking"),
    ("I made a mistake in the second line.", "backtracking"),
    ("Maybe the answer is 12.", "uncertainty-estimation"),
    ("I'm not sure this is right.", "uncertainty-estimation"),
    ("Perhaps there is a simpler way.", "uncertainty-estimation"),
    ("Let's check: 3 * 4 = 12.", "example-testing"),
    ("Let me verify with n = 2.", "example-testing"),
    ("For example, take x = 1.", "example-testing"),
    ("Plugging in 5 gives 25.", "example-testing"),
    ("Recall that the sum of angles in a triangle is 180 degrees.", "adding-knowledge"),
    ("By definition, a prime has exactly two divisors.", "adding-knowledge"),
    ("Okay, so we need the total number of apples.", "initializing"),
    ("The problem asks for the sum of 12 and 7.", "initializing"),
    ("We need to find x.", "initializing"),
    ("So 12 + 7 = 19.", "deduction"),
    ("Therefore the area is 20.", "deduction"),
    ("The answer is nice.", None),
])
def test_heuristic_sentence_labels(sentence, label):
    assert annotate.HeuristicAnnotator().label_sentence(sentence) == label


def test_heuristic_rule_order_and_word_boundaries():
    h = annotate.HeuristicAnnotator()
    # backtracking outranks uncertainty, which outranks example-testing
    assert h.label_sentence("Wait, maybe we should check it.") == "backtracking"
    assert h.label_sentence("Maybe let's check it.") == "uncertainty-estimation"
    # "Butter" is not "But", "Waiting" is not "Wait", "somewhat" is not "what"
    assert h.label_sentence("Butter costs 3 dollars.") is None
    assert h.label_sentence("Waiting takes 5 minutes.") is None


def test_heuristic_spans_are_sentences_of_the_text():
    text = "Okay, we need 2 + 2. So 2 + 2 = 4. The end. Wait, is it 5? Let's check: 2 + 2 = 4."
    spans = annotate.HeuristicAnnotator().annotate(text)
    assert [(text[s["start"]:s["end"]], s["label"]) for s in spans] == [
        ("Okay, we need 2 + 2.", "initializing"),
        ("So 2 + 2 = 4.", "deduction"),
        ("Wait, is it 5?", "backtracking"),
        ("Let's check: 2 + 2 = 4.", "example-testing"),
    ]
    # a restricted label set only emits those labels
    only = annotate.HeuristicAnnotator(labels=["backtracking"]).annotate(text)
    assert [s["label"] for s in only] == ["backtracking"]
    with pytest.raises(annotate.AnnotationError, match="unknown labels"):
        annotate.HeuristicAnnotator(labels=["bogus"])


def test_sentence_labels_majority_and_counts_sum_to_sentences():
    text = "Aaaa aaaa. Bbbb bbbb bbbb. Cccc."
    #         0123456789012345678901234567890
    spans = [{"start": 0, "end": 10, "label": "deduction"},
             {"start": 11, "end": 15, "label": "backtracking"},  # 4 chars of sentence 2
             {"start": 15, "end": 26, "label": "uncertainty-estimation"}]  # 11 chars of sentence 2
    assert annotate.sentence_labels(text, spans) == ["deduction", "uncertainty-estimation", None]
    counts = annotate.label_counts([text, "Wait."], [spans, [{"start": 0, "end": 5, "label": "backtracking"}]])
    assert counts["deduction"] == 1 and counts["uncertainty-estimation"] == 1 and counts["backtracking"] == 1
    assert counts[annotate.NONE_LABEL] == 1 and sum(counts.values()) == 4
    fr = annotate.fractions(counts)
    assert abs(sum(fr.values()) - 1) < 1e-12 and fr["none"] == 0.25
    assert annotate.fractions({"a": 0}) == {"a": 0.0}


def test_normalize_label():
    assert annotate.normalize_label("Uncertainty_Estimation") == "uncertainty-estimation"
    assert annotate.normalize_label("5. backtracking") == "backtracking"
    assert annotate.normalize_label('"adding knowledge"') == "adding-knowledge"
    assert annotate.normalize_label("summary") is None


# --------------------------------------------------------------------------------------------------------------------
# The chat annotator, offline


TEXT = "Okay, so we need 3 + 4.\nThat is 7.  Wait, maybe it is 8? Let me check: 3 + 4 = 7. That is 7."


class FakeTransport:
    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def __call__(self, url, payload, headers, timeout):
        self.calls.append((url, payload, headers, timeout))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def chat(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_prompt_lists_labels_and_contains_the_text():
    msgs = annotate.build_messages(TEXT)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    body = msgs[0]["content"]
    assert TEXT in body and '["label"]...["end-section"]' in body
    for i, label in enumerate(annotate.LABELS):
        assert f"{i}. {label} -> {annotate.LABEL_DESCRIPTIONS[label]}" in body
    with_system = annotate.build_messages("x", labels=["backtracking"], system="You annotate.")
    assert with_system[0] == {"role": "system", "content": "You annotate."}
    assert "initializing" not in with_system[1]["content"]


def test_chat_annotator_request_and_alignment(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    reply = ('["initializing"]Okay, so we need 3 + 4.["end-section"]\n'
             '["deduction"]That is   7.["end-section"]'                 # whitespace differs from the text
             '["backtracking"]Wait,["end-section"]'
             '["uncertainty-estimation"]maybe it is 8?["end-section"]'
             '["example-testing"]Let me check: 3 + 4 = 7.["end-section"]'
             '["deduction"]That is 7.["end-section"]'                   # the second occurrence
             '["summary"]whatever["end-section"]'                       # unknown label
             '["deduction"]This sentence is not in the text.["end-section"]')
    fake = FakeTransport([chat(reply)])
    ann = annotate.ChatAnnotator(model="judge-1", base_url="http://localhost:8000/v1/", api_key_env="MY_KEY",
                                 transport=fake)
    spans = ann.annotate(TEXT)
    url, payload, headers, _ = fake.calls[0]
    assert url == "http://localhost:8000/v1/chat/completions"
    assert payload["model"] == "judge-1" and payload["temperature"] == 0.0
    assert payload["messages"] == annotate.build_messages(TEXT)
    assert headers == {"Authorization": "Bearer sk-test"}
    got = [(TEXT[s["start"]:s["end"]], s["label"]) for s in spans]
    assert got == [
        ("Okay, so we need 3 + 4.", "initializing"),
        ("That is 7.", "deduction"),
        ("Wait,", "backtracking"),
        ("maybe it is 8?", "uncertainty-estimation"),
        ("Let me check: 3 + 4 = 7.", "example-testing"),
        ("That is 7.", "deduction"),
    ]
    assert spans[-1]["start"] > spans[1]["start"]  # the repeated phrase went to its second occurrence
    assert ann.stats["aligned"] == 6 and ann.stats["unknown_label"] == 1 and ann.stats["unaligned"] == 1


def test_parse_annotation_tolerates_unquoted_labels_and_case():
    spans, stats = annotate.parse_annotation("Hmm. WAIT, no.",
                                             "[backtracking]hmm.[end-section] [Backtracking] wait, no.[end_section]")
    assert [(s["start"], s["end"], s["label"]) for s in spans] == [(0, 4, "backtracking"), (5, 14, "backtracking")]
    assert stats["aligned"] == 2


def test_response_errors_are_clear():
    with pytest.raises(annotate.AnnotationError, match="no choices"):
        annotate.response_content({"id": "x"})
    with pytest.raises(annotate.AnnotationError, match="rate limited"):
        annotate.response_content({"error": {"message": "rate limited"}})
    parts = [{"type": "text", "text": "a"}, {"text": "b"}]
    assert annotate.response_content({"choices": [{"message": {"content": parts}}]}) == "ab"


def test_retries_transient_http_errors_then_gives_up(monkeypatch):
    monkeypatch.setattr(annotate.time, "sleep", lambda s: None)

    def http(code):
        return urllib.error.HTTPError("http://x", code, "err", {}, io.BytesIO(b'{"error": "busy"}'))

    fake = FakeTransport([http(429), http(503), chat('["backtracking"]Wait,["end-section"]')])
    ann = annotate.ChatAnnotator(base_url="http://x", api_key="k", transport=fake, retries=3)
    assert ann.annotate(TEXT)[0]["label"] == "backtracking"
    assert len(fake.calls) == 3
    fake = FakeTransport([http(401)])
    with pytest.raises(annotate.AnnotationError, match="HTTP 401.*OPENAI_API_KEY"):
        annotate.ChatAnnotator(base_url="http://x", api_key_env="OPENAI_API_KEY", transport=fake).annotate(TEXT)
    fake = FakeTransport([urllib.error.URLError("refused")] * 2)
    with pytest.raises(annotate.AnnotationError, match="unreachable"):
        annotate.ChatAnnotator(base_url="http://x", transport=fake, retries=1).annotate(TEXT)


def test_no_key_no_auth_header_and_env_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge:1234/v1")
    ann = annotate.ChatAnnotator()
    assert ann.headers() == {} and ann.url == "http://judge:1234/v1/chat/completions"


def test_urllib_transport_posts_json(monkeypatch):
    seen = {}

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def fake_urlopen(req, timeout):
        seen.update(url=req.full_url, body=json.loads(req.data), headers=dict(req.header_items()), timeout=timeout)
        return Resp(json.dumps(chat("ok")).encode())

    monkeypatch.setattr(annotate.urllib.request, "urlopen", fake_urlopen)
    out = annotate.urllib_transport("http://h/v1/chat/completions", {"a": 1}, {"Authorization": "Bearer k"}, 5.0)
    assert annotate.response_content(out) == "ok"
    assert seen["body"] == {"a": 1} and seen["headers"]["Authorization"] == "Bearer k" and seen["timeout"] == 5.0
    assert seen["headers"]["Content-type"] == "application/json"


def test_make_annotator_and_annotate_traces():
    h = annotate.make_annotator("heuristic")
    recs = annotate.annotate_traces(h, ["Wait, no.", "So 1 + 1 = 2."], prompts=["P1", None], extra=[{"q": 1}, {"q": 2}])
    assert recs[0] == {"prompt": "P1", "text": "Wait, no.", "spans": [{"start": 0, "end": 9, "label": "backtracking"}],
                       "q": 1}
    assert "prompt" not in recs[1] and recs[1]["spans"][0]["label"] == "deduction"
    assert isinstance(annotate.make_annotator("chat", model="m", base_url="http://x"), annotate.ChatAnnotator)
    with pytest.raises(annotate.AnnotationError, match="unknown annotator"):
        annotate.make_annotator("oracle")
