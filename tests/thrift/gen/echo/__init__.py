__all__ = ['ttypes', 'constants', 'Echo', 'Calc']
