#!/usr/bin/perl
# Verify every DKIM signature of the message on stdin with Mail::DKIM (the verifier
# behind SpamAssassin and Amavis), resolving keys through the given DNS server.
#   perl dkim_verify.pl HOST PORT < message
# Prints one line per signature: "<result> d=<domain> s=<selector> a=<algorithm> <detail>",
# then "overall <result>".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;

my ($host, $port) = @ARGV;
my $res = Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 1,
                                  udp_timeout => 5, tcp_timeout => 5, retry => 2);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    my $detail = $sig->result_detail // '';
    printf "%s d=%s s=%s a=%s %s\n", $sig->result, $sig->domain, $sig->selector,
        $sig->algorithm, $detail;
}
printf "overall %s\n", $dkim->result;
