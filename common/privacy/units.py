"""What a privacy guarantee protects, in words: the unit whose presence ε bounds.

Sample-level DP (DP-SGD on each client) protects one training example of one client,
a sentence where the task tags words; client-level DP (DP-FedAvg on the server)
protects all data of one client. The report and the client-level mechanism's record
(``client_level.json``) state the unit with these words.
"""

SAMPLE_UNIT = "one training example of one client"
#: task=token_classification: the example is a sentence, whatever number of words it has.
SENTENCE_UNIT = "one sentence (one training example) of one client"
CLIENT_UNIT = "all data of one client"
