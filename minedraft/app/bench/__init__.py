"""`minedraft bench`: AR, SD and PSD side by side on one workload, with the overlap made visible."""
