"""The task kinds a round can run, and what each kind's phone and server halves share.

* `personal`  — personalization: the personal model, how it is judged, the counts that leave a phone;
* `discovery` — federated discovery of new words (TrieHH).
"""
