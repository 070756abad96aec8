class UserError(Exception):
    """A problem with what the user asked for or gave us (bad flag, missing file, no GPU).

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


OFFLINE_HINT = ("without network access pass local copies: --image-weights FILE (a torchvision state_dict) and "
                "--text-model DIR (a Hugging Face BERT folder), or --pretrained none for random init")
