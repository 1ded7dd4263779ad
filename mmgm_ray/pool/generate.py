"""placeholder"""
def generate_dataset(*a, **k):
    raise NotImplementedError
