"""Does a trained arithmetic run still answer when the problem comes after other text, as in a chat reply?

    python bench/arithmetic_after_context.py RUN [RUN ...]

For 600 held-out problems, greedy answers with 0, 1 and 2 solved training lines before the prompt (the lines end
in newlines, as in the training text); prints exact-match accuracy for each."""
import sys

from homellm.checkpoint import load_model
from homellm.eval import greedy_complete, stop_ids
from homellm.tasks import arithmetic
from homellm.tokenizer import Tokenizer

problems = arithmetic.generate(600, 3, split="heldout")
filler = arithmetic.generate(400, 11, split="train")
for run in sys.argv[1:]:
    model, tok = load_model(run, "best", "cpu"), Tokenizer.load(run)
    for lines in (0, 1, 2):
        prompts = ["".join(arithmetic.line(filler[(i + j) % len(filler)]) + "\n" for j in range(lines))
                   + arithmetic.prompt(p) for i, p in enumerate(problems)]
        answers = greedy_complete(model, tok, prompts, 24, stop_ids(tok, "$\n"), desc=f"{lines} lines before")
        exact = sum(arithmetic.parse_completion(a) == p.result for a, p in zip(answers, problems)) / len(problems)
        mean = sum(map(len, prompts)) / len(prompts)
        print(f"{run}: {lines} solved lines before the prompt (mean prompt {mean:.0f} chars): {100 * exact:.1f} %")
