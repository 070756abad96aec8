class UserError(Exception):
    """A problem with what the user asked for or gave us (bad flag, missing file, no GPU).

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message as one line, for a ``UserError``: libraries (onnxruntime, inductor) raise pages."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


OFFLINE_HINT = ("without network access pass local copies: --image-weights FILE (a torchvision state_dict) and "
                "--text-model DIR (a Hugging Face BERT folder), or --pretrained none for random init")
