"""Multi-stage flows: plans composed from the floors below (sweep, train, report), e.g. the paper."""
